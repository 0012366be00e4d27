"""DAPO's overlong reward shaping: a soft penalty for completions that run into the length limit.

From DAPO (Yu et al., 2025, https://arxiv.org/abs/2503.14476, Eq. 13), with L_max the length limit and
L_buffer the soft-punishment zone before it, for a completion of |y| tokens::

    R(y) = 0                                  if |y| <= L_max - L_buffer
    R(y) = ((L_max - L_buffer) - |y|) / L_buffer  if L_max - L_buffer < |y| <= L_max
    R(y) = -1                                 if |y| > L_max

so the penalty grows linearly from 0 to -1 over the last L_buffer tokens. It is added to the task reward (DAPO
uses it with a correctness reward), as TRL's ``get_soft_overlong_punishment`` is; tested equal to it.
"""

from __future__ import annotations

from typing import Any

from .base import RewardFunction

__all__ = ["OverlongPenalty", "soft_overlong_punishment"]


def soft_overlong_punishment(length: int, max_completion_length: int, overlong_buffer: int) -> float:
    """R(y) of the module docstring for a completion of ``length`` tokens."""
    soft_start = max_completion_length - overlong_buffer
    if length <= soft_start:
        return 0.0
    if length <= max_completion_length:
        return (soft_start - length) / overlong_buffer
    return -1.0


class OverlongPenalty(RewardFunction):
    """DAPO's soft overlong punishment (see the module docstring) on the number of generated tokens.

    ``max_completion_length`` should be GRPOConfig's ``max_completion_length``; ``overlong_buffer`` is the
    length of the punishment zone (DAPO: 4,096 of 20,480; TRL's script: 256 of 1,280). It reads the
    ``completion_ids`` the trainer passes to every reward.
    """

    name = "overlong_penalty"

    def __init__(self, max_completion_length: int, overlong_buffer: int, *, name: str | None = None,
                 weight: float | None = None, penalty: float | None = None) -> None:
        super().__init__(name=name, weight=weight, penalty=penalty)
        for label, value in (("max_completion_length", max_completion_length), ("overlong_buffer", overlong_buffer)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{self.name}: {label} must be an int, got {value!r}")
        if max_completion_length < 1:
            raise ValueError(f"{self.name}: max_completion_length must be >= 1, got {max_completion_length}")
        if not 0 <= overlong_buffer <= max_completion_length:
            raise ValueError(f"{self.name}: overlong_buffer must be in [0, max_completion_length="
                             f"{max_completion_length}], got {overlong_buffer}")
        self.max_completion_length = max_completion_length
        self.overlong_buffer = overlong_buffer

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None,
                 **columns: Any) -> list[float]:
        if completion_ids is None:
            raise KeyError(f"{self.name} needs completion_ids (the generated token ids, which GRPOTrainer passes)")
        return [soft_overlong_punishment(len(ids), self.max_completion_length, self.overlong_buffer)
                for ids in completion_ids]
