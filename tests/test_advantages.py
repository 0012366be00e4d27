"""rlcore.advantages against a plain numpy reference (and hand values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlcore.advantages import STD_EPS, group_advantages, group_reward_std, nan_std, weighted_rewards

TOL = 1e-12  # float64


def numpy_advantages(rewards: np.ndarray, g: int, scale: str) -> np.ndarray:
    """The textbook formula, NaN-aware: (r - nanmean_group) / (nanstd(ddof=1) + 1e-4); NaN → 0."""
    grouped = rewards.reshape(-1, g)
    mean = np.repeat(np.nanmean(grouped, axis=1), g)
    with np.errstate(invalid="ignore", divide="ignore"):
        if scale == "group":
            std = np.repeat(np.nanstd(grouped, axis=1, ddof=1), g)
        else:
            std = np.full_like(rewards, np.nanstd(rewards, ddof=1))
        out = rewards - mean
        if scale != "none":
            out = out / (std + 1e-4)
    return np.nan_to_num(out, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("g", [2, 4, 8])
def test_matches_numpy(scale, g):
    rng = np.random.default_rng(g)
    rewards = rng.normal(size=4 * g) * 3 + 1
    rewards[:g] = 2.5  # a zero-std group: advantages exactly 0
    advantages, stats = group_advantages(torch.tensor(rewards), g, scale)
    np.testing.assert_allclose(advantages.numpy(), numpy_advantages(rewards, g, scale), rtol=0, atol=TOL)
    assert np.all(advantages.numpy()[:g] == 0.0)
    assert stats["frac_zero_std_groups"] == 0.25
    group_std = np.nanstd(rewards.reshape(-1, g), axis=1, ddof=1)
    np.testing.assert_allclose(group_reward_std(torch.tensor(rewards), g).numpy(), group_std, rtol=0, atol=TOL)
    assert stats["reward_std_group_mean"] == pytest.approx(group_std.mean(), abs=TOL)
    expected_frac = 0.0 if scale == "batch" else 0.25  # TRL's metric follows the std used for scaling
    assert stats["frac_reward_zero_std"] == expected_frac


def test_hand_values():
    # group (0, 1): mean 0.5, unbiased std sqrt(0.5); A = ±0.5 / (0.70710678 + 1e-4)
    advantages, _ = group_advantages(torch.tensor([0.0, 1.0, 3.0, 3.0], dtype=torch.float64), 2, "group")
    a = 0.5 / (np.sqrt(0.5) + STD_EPS)
    np.testing.assert_allclose(advantages.numpy(), [-a, a, 0.0, 0.0], rtol=0, atol=TOL)
    assert STD_EPS == 1e-4
    # "none" (Dr. GRPO): only centred
    advantages, _ = group_advantages(torch.tensor([0.0, 1.0, 3.0, 5.0], dtype=torch.float64), 2, False)
    np.testing.assert_allclose(advantages.numpy(), [-0.5, 0.5, -1.0, 1.0], rtol=0, atol=TOL)
    # bool True is "group"
    same, _ = group_advantages(torch.tensor([0.0, 1.0, 3.0, 5.0]), 2, True)
    ref, _ = group_advantages(torch.tensor([0.0, 1.0, 3.0, 5.0]), 2, "group")
    assert torch.equal(same, ref)


def test_nan_rewards_are_left_out_and_get_zero_advantage():
    rewards = np.array([1.0, np.nan, 3.0, 0.0, 0.0, np.nan])  # G = 3: group 2 has one scorable value
    advantages, _ = group_advantages(torch.tensor(rewards), 3, "group")
    np.testing.assert_allclose(advantages.numpy(), numpy_advantages(rewards, 3, "group"), rtol=0, atol=TOL)
    assert advantages[1] == 0.0 and advantages[5] == 0.0
    assert torch.isfinite(advantages).all()


def test_weighted_rewards_nansum():
    per_func = torch.tensor([[1.0, 2.0], [np.nan, 4.0], [np.nan, np.nan]], dtype=torch.float64)
    total = weighted_rewards(per_func, [0.5, 2.0])
    assert total[:2].tolist() == [4.5, 8.0]
    assert torch.isnan(total[2])  # unscorable: every reward NaN
    assert weighted_rewards(per_func[:1]).tolist() == [3.0]


def test_nan_std_is_unbiased():
    x = torch.tensor([[1.0, 2.0, 4.0, np.nan]], dtype=torch.float64)
    assert float(nan_std(x, dim=1)) == pytest.approx(np.std([1, 2, 4], ddof=1), abs=TOL)
    assert torch.isnan(nan_std(torch.tensor([1.0, np.nan])))


def test_bad_input():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "mean")
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(4), 0, "group")
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(torch.zeros(5), 2, "group")
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(2, 2), 2, "group")
    with pytest.raises(ValueError, match="weights"):
        weighted_rewards(torch.zeros(3, 2), [1.0])
    with pytest.raises(ValueError, match="rewards_per_func"):
        weighted_rewards(torch.zeros(3), [1.0])
