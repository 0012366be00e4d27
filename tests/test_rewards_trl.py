"""Reward semantics against TRL 1.16's own code: None rewards ("does not apply") and DAPO's overlong shaping.

TRL's ``GRPOTrainer._calculate_rewards`` runs unmodified on a bare trainer object, and its
``_generate_and_score_completions`` (weighted sum, advantages, reward metrics) through the harness of
``test_loss_trl.py``; rlcore's ``score_completions`` / ``group_advantages`` get the same reward outputs.
"""

from __future__ import annotations

import math
import types
import warnings

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")

from rlcore.advantages import group_advantages  # noqa: E402
from rlcore.rewards import OverlongPenalty, as_reward_function, score_completions  # noqa: E402

# 6 completions, G = 3, two rewards; row 3: no reward applies; rows 1 and 4: one does not
OUTPUTS = {
    "r0": [0.5, None, -1.25, None, 2.0, 0.75],
    "r1": [1.0, 3.0, None, None, None, -0.5],
}
WEIGHTS = [1.0, 0.5]  # as test_loss_trl.REWARD_WEIGHTS


def _reward(name):
    def reward(prompts, completions, **kwargs):
        return list(OUTPUTS[name])

    reward.__name__ = name
    return reward


def _ours():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return score_completions([as_reward_function(_reward(n)) for n in OUTPUTS], ["p"] * 6, ["c"] * 6, {},
                                 WEIGHTS)


def _trl_rewards_per_func() -> torch.Tensor:
    from accelerate import Accelerator
    from trl import GRPOTrainer

    trainer = types.SimpleNamespace(
        accelerator=Accelerator(cpu=True), reward_funcs=[_reward(n) for n in OUTPUTS],
        reward_processing_classes=[None, None], reward_func_names=list(OUTPUTS),
        state=types.SimpleNamespace(global_step=0), args=types.SimpleNamespace(report_to=[]),
        _log_completion_extra=None, _log_metric=None, environments=None)
    inputs = [{"prompt": "p"} for _ in range(6)]
    return GRPOTrainer._calculate_rewards(trainer, inputs, ["p"] * 6, ["c"] * 6, [[1]] * 6)


def test_none_values_match_trl():
    trl_values = _trl_rewards_per_func()
    ours = _ours()
    assert torch.equal(torch.isnan(trl_values), torch.from_numpy(np.isnan(ours.values)))
    np.testing.assert_array_equal(np.nan_to_num(ours.values, nan=7.0),
                                  np.nan_to_num(trl_values.double().numpy(), nan=7.0))


def test_none_weighted_sum_advantages_and_metrics_match_trl():
    from test_loss_trl import G, trl_run

    trl_values = _trl_rewards_per_func().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, inputs, trl_metrics = trl_run({}, use_vllm_is=False, num_iterations=1, rewards=trl_values)
    ours = _ours()
    rewards = torch.as_tensor(ours.weighted_sum(), dtype=torch.float32)  # as the trainer does
    assert torch.isnan(rewards[3]) and not torch.isnan(rewards[[0, 1, 2, 4, 5]]).any()
    advantages, _ = group_advantages(rewards, G, "group")
    torch.testing.assert_close(advantages.double(), inputs["advantages"].double(), rtol=1e-6, atol=1e-6)
    assert advantages[3] == 0.0
    metrics = ours.metrics()
    for trl_key, our_key in (("reward", "reward_mean"), ("reward_std", "reward_std"),
                             ("rewards/r0/mean", "rewards/r0/mean"), ("rewards/r0/std", "rewards/r0/std"),
                             ("rewards/r1/mean", "rewards/r1/mean"), ("rewards/r1/std", "rewards/r1/std")):
        assert metrics[our_key] == pytest.approx(trl_metrics[trl_key], rel=1e-6), our_key


def test_all_none_batch_is_unscorable_not_an_error():
    def never(prompts, completions, **kwargs):
        return [None] * len(completions)

    scores = score_completions([as_reward_function(never)], ["p"] * 4, ["c"] * 4, {})
    advantages, _ = group_advantages(torch.as_tensor(scores.weighted_sum(), dtype=torch.float32), 2, "group")
    assert torch.equal(advantages, torch.zeros(4))
    assert math.isnan(scores.metrics()["reward_mean"])


@pytest.mark.parametrize("max_length, buffer", [(100, 20), (16, 16), (12, 0), (1280, 256), (7, 3)])
def test_overlong_penalty_equals_trl(max_length, buffer):
    from trl.rewards import get_soft_overlong_punishment

    ids = [[1] * length for length in range(max_length + 4)]
    expected = get_soft_overlong_punishment(max_completion_len=max_length, soft_punish_cache=buffer)(
        completion_ids=ids)
    reward = OverlongPenalty(max_length, buffer)
    assert reward(["p"] * len(ids), ["c"] * len(ids), completion_ids=ids) == expected
    scores = score_completions([reward], ["p"] * len(ids), ["c"] * len(ids), {"completion_ids": ids})
    assert scores.values[:, 0].tolist() == expected


def test_overlong_penalty_values_and_validation():
    reward = OverlongPenalty(100, 20)
    out = reward([], [], completion_ids=[[0] * n for n in (80, 81, 90, 100, 101)])
    assert out == [0.0, -0.05, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="overlong_buffer must be in"):
        OverlongPenalty(10, 11)
    with pytest.raises(ValueError, match="max_completion_length must be an int"):
        OverlongPenalty(10.0, 2)
    with pytest.raises(KeyError, match="completion_ids"):
        reward(["p"], ["c"])
