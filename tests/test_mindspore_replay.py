"""Replays trajectories recorded with MindSpore 2.10's nn.LARS(nn.Momentum) through lars_fx.LARS.

See tests/fixtures/mindspore/README.md for how the fixtures were made. Every step of every scenario
must match MindSpore to float32 rounding (rtol 2e-4).
"""

import pytest
import torch

from mindspore_replay import SCENARIOS, replay_lars


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per_tensor"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_matches_mindspore(name, foreach):
    replay_lars(name, foreach=foreach)


@pytest.mark.parametrize("name", ["default_filter_coef02", "use_clip_dynamic_lr", "grouped_weight_decay"])
def test_matches_mindspore_through_torch_compile_of_step(name):
    torch._dynamo.reset()
    replay_lars(name, compile_step=True)


def test_zero_weight_stays_zero_as_in_mindspore():
    model = replay_lars("zero_weight_fc1")
    assert torch.count_nonzero(model.fc1.weight) == 0


def test_fixtures_cover_the_scenarios_of_the_contract():
    contract = {"default_filter", "use_clip_dynamic_lr", "grouped_weight_decay", "custom_filter_no_momentum"}
    assert contract <= set(SCENARIOS)
