"""Group-relative advantages (GRPO), as pure functions; TRL 1.16 semantics ("sum_then_normalize").

Completions ``[i·G, (i+1)·G)`` are the G = ``num_generations`` samples of prompt ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlcore.config import SCALE_REWARDS  # the one list of allowed names
# added to the std before dividing, as TRL does: a group whose rewards are all equal gets advantage 0, not NaN
STD_EPS = 1e-4


def weighted_rewards(rewards_per_func: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Scalar reward per completion: Σ_j w_j · r_ij, skipping NaN entries (a reward that did not apply).

    A completion for which *every* reward is NaN is unscorable: its reward is NaN (not 0), so
    :func:`group_advantages` leaves it out of its group's mean and std and gives it advantage 0.
    ``rewards_per_func`` is ``[N, R]``; ``weights`` defaults to all ones.
    """
    if not isinstance(rewards_per_func, torch.Tensor) or rewards_per_func.dim() != 2:
        raise ValueError("rewards_per_func must be a [num_completions, num_rewards] tensor, got "
                         f"{getattr(rewards_per_func, 'shape', type(rewards_per_func).__name__)}")
    if weights is None:
        weights = torch.ones(rewards_per_func.shape[1], dtype=rewards_per_func.dtype)
    weights = torch.as_tensor(weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    if weights.shape != (rewards_per_func.shape[1],):
        raise ValueError(f"weights has {weights.numel()} entries for {rewards_per_func.shape[1]} reward functions")
    total = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    return total.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def nan_std(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased (Bessel, n − 1) standard deviation ignoring NaNs; NaN where fewer than 2 values remain."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    squares = torch.where(torch.isnan(x), torch.zeros_like(x), (x - mean) ** 2).sum(dim=dim, keepdim=True)
    variance = squares / (count - 1).clamp(min=1)
    std = torch.where(count > 1, variance.sqrt(), torch.full_like(variance, float("nan")))
    if not keepdim:
        std = std.squeeze(dim) if dim is not None else std.reshape(())
    return std


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str | bool = "group"
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """A_i = (r_i − mean_group(r)) / (std + 1e-4), one value per completion, shape ``[N]``.

    * ``scale_rewards="group"`` (True): std of the completion's group
    * ``"batch"``: std of the whole batch (the mean is still the group's)
    * ``"none"`` (False): no division, A_i = r_i − mean_group(r) (Dr. GRPO)

    Means and stds ignore NaN rewards (unscorable completions); the std is the unbiased (n − 1) one; a NaN
    advantage (unscorable completion, or a group with a single scorable one) becomes 0. Same as TRL 1.16,
    except that the arithmetic is float64 (TRL: float32), so rewards up to ±1.7e38 keep a finite std; the
    advantages come back in the rewards' dtype.

    Returns (advantages, stats) with float stats for logging: ``reward_std_group_mean`` (mean over groups of
    the within-group std), ``frac_zero_std_groups`` (groups whose rewards are all equal: no learning signal),
    and ``frac_reward_zero_std`` (TRL's metric: fraction of completions whose scaling std is 0 — equal to the
    previous one except with ``scale_rewards="batch"``). Use :func:`group_reward_std` for the per-group stds.
    """
    if scale_rewards is True:
        scale_rewards = "group"
    elif scale_rewards is False:
        scale_rewards = "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not allowed: expected one of {SCALE_REWARDS}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations={num_generations!r} is not allowed: expected an integer >= 1")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor, got {getattr(rewards, 'shape', type(rewards).__name__)}")
    if rewards.numel() == 0 or rewards.numel() % num_generations:
        raise ValueError(f"rewards has {rewards.numel()} values, not a positive multiple of "
                         f"num_generations={num_generations}")
    # float64 inside: squared deviations of float32 rewards above ~1.8e19 would overflow float32 and turn
    # the std into inf, i.e. every advantage silently into 0
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    rewards = rewards.to(torch.float64)
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    group_std = group_reward_std(rewards, num_generations)
    if scale_rewards == "batch":
        std = nan_std(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = group_std.repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    advantages = torch.nan_to_num(advantages, nan=0.0).to(out_dtype)
    group_zero = torch.isclose(group_std, torch.zeros_like(group_std))
    stats = {
        "reward_std_group_mean": float(torch.nanmean(group_std)) if not torch.isnan(group_std).all() else 0.0,
        "frac_zero_std_groups": float(group_zero.to(torch.float64).mean()),
        "frac_reward_zero_std": float(torch.isclose(std, torch.zeros_like(std)).to(torch.float64).mean()),
    }
    return advantages, stats


def group_reward_std(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Unbiased std of each group's rewards (NaNs ignored), shape ``[N / num_generations]``; 0 when G = 1."""
    grouped = rewards.view(-1, num_generations)
    if num_generations == 1:
        return torch.zeros(grouped.shape[0], dtype=rewards.dtype, device=rewards.device)
    return nan_std(grouped, dim=1)
