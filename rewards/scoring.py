"""Runs every reward on a batch of completions and validates what comes back."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import RewardError, RewardFunction


@dataclass
class RewardScores:
    """Per-completion scores: ``values[i, j]`` is reward ``names[j]`` of completion ``i``."""

    values: np.ndarray
    names: list[str]
    weights: np.ndarray
    failures: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def weighted_sum(self) -> np.ndarray:
        """``sum_j weights[j] * values[:, j]``: the scalar reward of each completion."""
        return self.values @ self.weights


def score_completions(
    rewards: list[RewardFunction],
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, list[Any]],
    weights: list[float] | None = None,
) -> RewardScores:
    """Scores ``completions`` with every reward; raises :class:`RewardError` naming the reward and sample.

    ``weights`` (GRPOConfig.reward_weights) overrides each reward's own ``weight`` when given.
    """
    import time

    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions")
    for key, column in columns.items():
        if len(column) != n:
            raise ValueError(f"column {key!r} has {len(column)} values for {n} completions")
    if weights is not None and len(weights) != len(rewards):
        raise ValueError(f"reward_weights has {len(weights)} entries for {len(rewards)} reward functions")
    values = np.zeros((n, len(rewards)), dtype=np.float64)
    failures: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for j, reward in enumerate(rewards):
        start = time.perf_counter()
        try:
            out = reward(prompts, completions, **columns)
        except RewardError:
            raise
        except Exception as error:  # a user's reward failing is reported with its name
            if reward.penalty is None:
                raise RewardError(f"reward {reward.name!r} raised {type(error).__name__}: {error}") from error
            warnings.warn(f"reward {reward.name!r} raised {type(error).__name__}: {error}; "
                          f"using penalty {reward.penalty} for the whole batch", stacklevel=2)
            out = [reward.penalty] * n
            failures[reward.name] = failures.get(reward.name, 0) + n
        seconds[reward.name] = time.perf_counter() - start
        try:
            out = list(out)
        except TypeError:
            raise RewardError(f"reward {reward.name!r} returned {type(out).__name__}, expected a list of "
                              f"{n} floats") from None
        if len(out) != n:
            raise RewardError(f"reward {reward.name!r} returned {len(out)} values for {n} completions")
        for i, value in enumerate(out):
            number = _as_finite_float(value)
            if number is None:
                if reward.penalty is None:
                    raise RewardError(f"reward {reward.name!r} returned {value!r} for sample {i} "
                                      f"(completion {str(completions[i])[:80]!r}); expected a finite number")
                number = float(reward.penalty)
                failures[reward.name] = failures.get(reward.name, 0) + 1
            values[i, j] = number
    weight_array = np.asarray(weights if weights is not None else [r.weight for r in rewards], dtype=np.float64)
    return RewardScores(values, [r.name for r in rewards], weight_array, failures, seconds)


def _as_finite_float(value: Any) -> float | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
