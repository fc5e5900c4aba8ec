"""Replays trajectories recorded with MindSpore 2.10's nn.LARS(nn.Momentum) through lars_fx.LARS.

The fixtures (tests/fixtures/mindspore, see its README) hold the initial parameters, the data of each
step and MindSpore's parameters after each of 6 steps. Here the same model is trained from the same
start with the public API, and every step must match MindSpore to float32 rounding.
"""

import json
from pathlib import Path

import pytest
import torch

import lars_fx

FIXTURES = Path(__file__).parent / "fixtures" / "mindspore"
SCENARIOS = sorted(p.stem for p in FIXTURES.glob("*.json") if p.stem != "larsupdate_probe")

# The scenarios' lars_filter, written for torch names (MindSpore's LayerNorm.gamma/beta are torch's
# LayerNorm.weight/bias); the test checks the resulting decisions against MindSpore's lars_flag.
CUSTOM_FILTERS = {
    "custom_filter_no_momentum": lambda p: p.name.startswith("fc1"),
    "custom_filter_layernorm": lambda p: "fc2" not in p.name,
}


class MLP(torch.nn.Module):
    def __init__(self, spec):
        super().__init__()
        layers = {layer["name"]: layer for layer in spec["layers"]}
        fc1, norm, fc2 = layers["fc1"], layers["LayerNorm"], layers["fc2"]
        self.fc1 = torch.nn.Linear(fc1["in_features"], fc1["out_features"])
        self.LayerNorm = torch.nn.LayerNorm(norm["normalized_shape"], eps=norm["eps"])
        self.fc2 = torch.nn.Linear(fc2["in_features"], fc2["out_features"])

    def forward(self, x):
        return self.fc2(torch.relu(self.LayerNorm(self.fc1(x))))


def _param_groups(model, scenario):
    """The SGD param groups a user writes to port the scenario's MindSpore optimizer."""
    hp, named = scenario["hyperparameters"], dict(model.named_parameters())
    if hp["param_groups"]:
        return [
            {"params": [(n, named[n]) for n in group["params"]], "weight_decay": group["weight_decay"]}
            for group in hp["param_groups"]
        ]
    # MindSpore's ungrouped optimizers skip weight decay for names with 'beta'/'gamma'; in torch that
    # is a group with weight_decay=0.
    decayed = [n for n in named if scenario["per_param"][n]["decay_flag"]]
    undecayed = [n for n in named if not scenario["per_param"][n]["decay_flag"]]
    groups = [{"params": [(n, named[n]) for n in decayed], "weight_decay": hp["weight_decay"]}]
    if undecayed:
        groups.append({"params": [(n, named[n]) for n in undecayed], "weight_decay": 0.0})
    return groups


def _replay(name, **lars_options):
    scenario = json.loads((FIXTURES / f"{name}.json").read_text())
    hp = scenario["hyperparameters"]
    model = MLP(scenario["model"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.tensor(scenario["initial_params"][n]))

    lrs = hp["lr_per_step"]
    base = torch.optim.SGD(_param_groups(model, scenario), lr=lrs[0], momentum=hp["momentum"])
    kwargs = {"lars_filter": CUSTOM_FILTERS[name]} if name in CUSTOM_FILTERS else {}
    opt = lars_fx.LARS(
        base, epsilon=hp["epsilon"], coefficient=hp["coefficient"], use_clip=hp["use_clip"], **kwargs, **lars_options
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lrs[min(t, len(lrs) - 1)] / lrs[0])

    decisions = {
        n: flag for group_index, group in enumerate(opt.param_groups)
        for n, flag in zip(group["param_names"], opt.lars_mask(group_index))
    }
    assert decisions == {n: scenario["per_param"][n]["lars_flag"] for n in decisions}

    for step in scenario["steps"]:
        assert opt.param_groups[0]["lr"] == pytest.approx(step["lr"], rel=1e-7)
        loss = torch.nn.functional.mse_loss(model(torch.tensor(step["x"])), torch.tensor(step["y"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
        for n, p in model.named_parameters():
            expected = torch.tensor(step["params_after"][n])
            torch.testing.assert_close(
                p.detach(), expected, rtol=2e-4, atol=1e-6, msg=lambda m: f"{name}, step {step['step']}, {n}: {m}"
            )
    return model


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per_tensor"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_matches_mindspore(name, foreach):
    _replay(name, foreach=foreach)


def test_zero_weight_stays_zero_as_in_mindspore():
    model = _replay("zero_weight_fc1")
    assert torch.count_nonzero(model.fc1.weight) == 0


def test_fixtures_cover_the_scenarios_of_the_contract():
    assert {"default_filter", "use_clip_dynamic_lr", "grouped_weight_decay", "custom_filter_no_momentum"} <= set(SCENARIOS)
