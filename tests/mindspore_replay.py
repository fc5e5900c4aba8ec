"""Shared by the tests that replay the MindSpore 2.10 fixtures (tests/fixtures/mindspore).

The fixtures hold the initial parameters, the data of each step and MindSpore's parameters after
each of 6 steps; a replay trains the same model from the same start and checks every step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import lars_fx

FIXTURES = Path(__file__).parent / "fixtures" / "mindspore"
SCENARIOS = sorted(p.stem for p in FIXTURES.glob("*.json") if p.stem != "larsupdate_probe")

# The scenarios' lars_filter, written for torch names (MindSpore's LayerNorm.gamma/beta are torch's
# LayerNorm.weight/bias); replays check the resulting decisions against MindSpore's lars_flag.
CUSTOM_FILTERS: dict[str, Callable[[lars_fx.ParamInfo], bool]] = {
    "custom_filter_no_momentum": lambda p: p.name.startswith("fc1"),
    "custom_filter_layernorm": lambda p: "fc2" not in p.name,
}


class MLP(torch.nn.Module):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        layers = {layer["name"]: layer for layer in spec["layers"]}
        fc1, norm, fc2 = layers["fc1"], layers["LayerNorm"], layers["fc2"]
        self.fc1 = torch.nn.Linear(fc1["in_features"], fc1["out_features"])
        self.LayerNorm = torch.nn.LayerNorm(norm["normalized_shape"], eps=norm["eps"])
        self.fc2 = torch.nn.Linear(fc2["in_features"], fc2["out_features"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.LayerNorm(self.fc1(x))))


def load(name: str) -> tuple[dict[str, Any], MLP]:
    """The scenario and its model at MindSpore's initial parameters."""
    scenario = json.loads((FIXTURES / f"{name}.json").read_text())
    model = MLP(scenario["model"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.tensor(scenario["initial_params"][n]))
    return scenario, model


def param_groups(model: MLP, scenario: dict[str, Any]) -> list[dict[str, Any]]:
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


def run(
    name: str, scenario: dict[str, Any], model: MLP, step: Callable[[], Any],
    before_step: Callable[[int], None],
) -> None:
    """Trains ``model`` on the scenario's data with ``step``; every step must match MindSpore's."""
    for index, record in enumerate(scenario["steps"]):
        before_step(index)
        loss = torch.nn.functional.mse_loss(model(torch.tensor(record["x"])), torch.tensor(record["y"]))
        model.zero_grad()
        loss.backward()
        step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(
                p.detach(),
                torch.tensor(record["params_after"][n]),
                rtol=2e-4,
                atol=1e-6,
                msg=lambda m, s=record["step"], n=n: f"{name}, step {s}, {n}: {m}",
            )


def replay_lars(name: str, compile_step: bool = False, **lars_options: Any) -> MLP:
    """Replays a scenario through ``lars_fx.LARS`` over ``torch.optim.SGD`` and an LR scheduler."""
    scenario, model = load(name)
    hp = scenario["hyperparameters"]
    lrs = hp["lr_per_step"]
    base = torch.optim.SGD(param_groups(model, scenario), lr=lrs[0], momentum=hp["momentum"])
    if name in CUSTOM_FILTERS:
        lars_options["lars_filter"] = CUSTOM_FILTERS[name]
    opt = lars_fx.LARS(
        base, epsilon=hp["epsilon"], coefficient=hp["coefficient"], use_clip=hp["use_clip"], **lars_options
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lrs[min(t, len(lrs) - 1)] / lrs[0])

    decisions = {
        n: flag
        for group_index, group in enumerate(opt.param_groups)
        for n, flag in zip(group["param_names"], opt.lars_mask(group_index), strict=True)
    }
    assert decisions == {n: scenario["per_param"][n]["lars_flag"] for n in decisions}

    step = torch.compile(opt.step) if compile_step else opt.step

    def before_step(index: int) -> None:
        if index:
            scheduler.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[index], rel=1e-7)

    run(name, scenario, model, step, before_step)
    return model

