"""Dynamic sampling (DAPO, Yu et al. 2025, arXiv 2503.14476, §3.2): fill the generation batch with groups that
teach something.

A group (the G completions of one prompt) whose rewards all tie has advantage 0 for every completion: it adds no
policy gradient, yet its tokens count in the loss's normaliser ("dapo" divides by the active tokens of the step)
and dilute the groups that do teach. With ``GRPOConfig(dynamic_sampling=True)`` such a group is dropped, and
completions of further prompts are generated until the batch holds ``needed`` informative groups:

* round 0 is the sampler's own prompts (what the generation holds without dynamic sampling);
* round k ≥ 1 draws ``n_k = min(needed, ⌈missing · tried / kept⌉)`` prompts (``needed`` while nothing was kept),
  uniformly without replacement from the dataset rows not yet drawn for this generation, with a generator
  seeded by ``(seed, generation, k)``: a resumed run draws the same prompts;
* at most ``max_retries`` rounds after round 0; informative groups beyond ``needed`` are not used.

If the batch is still short after the last round (or the dataset has no prompt left), the missing places are
filled with dropped groups, round 0's first, and the loss does not read them (:func:`select_groups` returns
their places as ``excluded``): every micro-step keeps its size, so the step trains on the informative groups
alone, and ``dynamic_sampling_filled`` is 0 in the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rlcore.advantages import group_reward_std


@dataclass
class SamplingRound:
    """The groups one round generated: ``prompt_rows[g]`` is the dataset row of group g, ``rewards`` the
    weighted reward of each completion (``len(prompt_rows) × num_generations``, NaN: unscorable), ``payload``
    whatever the caller keeps to build the batch (rollouts, scores)."""

    prompt_rows: list[int]
    rewards: np.ndarray
    payload: Any = None


@dataclass
class Selection:
    """The generation batch :func:`fill_generation` assembled."""

    groups: list[tuple[int, int]]  # (round, group within the round) of each group of the batch, in batch order
    excluded: list[int]  # places in ``groups`` of the filler groups the loss must not read
    rounds: list[SamplingRound]
    metrics: dict[str, float] = field(default_factory=dict)


def informative_groups(rewards: np.ndarray | torch.Tensor, num_generations: int) -> np.ndarray:
    """Which groups teach something: std_g > 0, the unbiased std of group g's rewards with NaN (unscorable)
    left out, as :func:`rlcore.advantages.group_advantages` computes it. A group whose rewards tie (std 0, up to
    ``torch.isclose``'s tolerance, as ``frac_zero_std_groups`` counts them) or that has fewer than two scorable
    completions (std NaN) has advantage 0 everywhere. Returns a bool array, one entry per group."""
    values = torch.as_tensor(np.asarray(rewards, dtype=np.float64))
    if values.dim() != 1 or values.numel() % num_generations:
        raise ValueError(f"rewards has shape {tuple(values.shape)}, expected a multiple of num_generations="
                         f"{num_generations} values")
    std = group_reward_std(values, num_generations)
    return (~torch.isnan(std) & ~torch.isclose(std, torch.zeros_like(std))).numpy()


def next_round_size(missing: int, tried: int, kept: int, needed: int) -> int:
    """Prompts for the next round: enough to fill ``missing`` places at the keep rate seen so far,
    ``min(needed, ⌈missing · tried / kept⌉)``, or ``needed`` when nothing has been kept yet."""
    if missing <= 0:
        return 0
    if kept == 0:
        return needed
    return min(needed, math.ceil(missing * tried / kept))


def extra_prompt_rows(dataset_size: int, count: int, key: Sequence[int], exclude: set[int]) -> list[int]:
    """``count`` dataset rows drawn uniformly without replacement from those not in ``exclude`` (fewer when
    fewer are left), by ``numpy.random.default_rng(key)``: the same key gives the same rows."""
    candidates = np.array([i for i in range(dataset_size) if i not in exclude], dtype=np.int64)
    count = min(count, len(candidates))
    if count <= 0:
        return []
    chosen = np.random.default_rng(list(key)).choice(candidates, size=count, replace=False)
    return [int(i) for i in chosen]


def select_groups(rounds: Sequence[SamplingRound], num_generations: int, needed: int
                  ) -> tuple[list[tuple[int, int]], list[int]]:
    """The batch's groups: the informative ones in round order, at most ``needed``; when fewer, the
    uninformative ones (round 0 first) fill the rest and their places are returned as ``excluded``."""
    informative, uninformative = [], []
    for r, sampling_round in enumerate(rounds):
        flags = informative_groups(sampling_round.rewards, num_generations)
        for g, flag in enumerate(flags):
            (informative if flag else uninformative).append((r, g))
    groups = informative[:needed]
    excluded = list(range(len(groups), needed))
    groups += uninformative[:needed - len(groups)]
    if len(groups) != needed:
        raise ValueError(f"{len(groups)} groups were generated, the batch needs {needed}")
    return groups, excluded


def fill_generation(first: SamplingRound, needed: int, num_generations: int, max_retries: int, dataset_size: int,
                    key: Sequence[int], draw: Callable[[int, list[int]], SamplingRound]) -> Selection:
    """Runs the rounds of the module docstring. ``first`` is round 0 (``needed`` groups); ``draw(k, rows)``
    generates and scores round k's prompts; ``key`` (e.g. ``(seed, generation)``) seeds the prompt draws.

    Metrics: ``dynamic_sampling_groups_dropped`` (uninformative groups generated, all rounds),
    ``dynamic_sampling_rounds`` (rounds after round 0), ``dynamic_sampling_extra_completions`` (completions
    generated after round 0), ``dynamic_sampling_excluded_groups`` (filler places) and
    ``dynamic_sampling_filled`` (1 when every group of the batch is informative).
    """
    if len(first.prompt_rows) != needed:
        raise ValueError(f"round 0 has {len(first.prompt_rows)} groups, expected {needed}")
    rounds = [first]
    drawn = set(first.prompt_rows)
    kept = int(informative_groups(first.rewards, num_generations).sum())
    tried = needed
    for k in range(1, max_retries + 1):
        count = next_round_size(needed - kept, tried, kept, needed)
        rows = extra_prompt_rows(dataset_size, count, [*key, k], drawn)
        if not rows:
            break
        sampling_round = draw(k, rows)
        if list(sampling_round.prompt_rows) != rows:
            raise ValueError(f"round {k} generated prompts {sampling_round.prompt_rows}, expected {rows}")
        rounds.append(sampling_round)
        drawn.update(rows)
        tried += len(rows)
        kept += int(informative_groups(sampling_round.rewards, num_generations).sum())
    groups, excluded = select_groups(rounds, num_generations, needed)
    metrics = {
        "dynamic_sampling_groups_dropped": float(tried - kept),
        "dynamic_sampling_rounds": float(len(rounds) - 1),
        "dynamic_sampling_extra_completions": float((tried - needed) * num_generations),
        "dynamic_sampling_excluded_groups": float(len(excluded)),
        "dynamic_sampling_filled": float(not excluded),
    }
    return Selection(groups=groups, excluded=excluded, rounds=rounds, metrics=metrics)
