"""Turning a list of rollouts into the padded tensors the loss consumes, and slicing them per micro-step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlcore.rollout import Rollout


@dataclass
class RolloutBatch:
    """One generation: every completion of every prompt, padded. Row ``i`` is completion ``i``.

    ``prompt_ids`` are left-padded and ``completion_ids`` right-padded, so ``prompt ‖ completion`` has all
    completions starting at the same column.
    """

    generation: int
    prompt_ids: torch.Tensor  # [N, P]
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C]
    sampling_logps: torch.Tensor  # [N, C] as the engine sampled
    truncated: torch.Tensor  # [N] bool
    advantages: torch.Tensor  # [N]
    old_logps: torch.Tensor | None = None  # [N, C] policy at generation time (off-policy replays, IS correction)
    ref_logps: torch.Tensor | None = None  # [N, C] adapter disabled (beta > 0)
    is_weights: torch.Tensor | None = None  # [N, C] truncated importance-sampling correction
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> RolloutBatch:
        return cls(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()})


def pad_rollouts(rollouts: list[Rollout], pad_token_id: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt_ids, prompt_mask, completion_ids, completion_mask, sampling_logps, truncated) as tensors."""
    prompt_width = max(len(r.prompt_ids) for r in rollouts)
    completion_width = max(1, max(len(r.completion_ids) for r in rollouts))
    count = len(rollouts)
    prompt_ids = torch.full((count, prompt_width), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((count, prompt_width), dtype=torch.long)
    completion_ids = torch.full((count, completion_width), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((count, completion_width), dtype=torch.long)
    sampling_logps = torch.zeros((count, completion_width), dtype=torch.float32)
    for i, rollout in enumerate(rollouts):
        if len(rollout.logprobs) != len(rollout.completion_ids):
            raise ValueError(f"rollout {i}: {len(rollout.logprobs)} logprobs for "
                             f"{len(rollout.completion_ids)} completion tokens")
        p, c = len(rollout.prompt_ids), len(rollout.completion_ids)
        prompt_ids[i, prompt_width - p:] = torch.tensor(rollout.prompt_ids, dtype=torch.long)
        prompt_mask[i, prompt_width - p:] = 1
        if c:
            completion_ids[i, :c] = torch.tensor(rollout.completion_ids, dtype=torch.long)
            completion_mask[i, :c] = 1
            sampling_logps[i, :c] = torch.tensor(rollout.logprobs, dtype=torch.float32)
    truncated = torch.tensor([r.truncated for r in rollouts], dtype=torch.bool)
    return tuple(t.to(device) for t in (prompt_ids, prompt_mask, completion_ids, completion_mask,
                                       sampling_logps, truncated))


def trimmed_inputs(batch: RolloutBatch, rows: list[int] | tuple[int, ...] | slice
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``input_ids``/``attention_mask`` of the selected rows with all-padding columns cut off both ends.

    Returns (input_ids, attention_mask, completion_width): the completion part keeps only as many columns as
    the longest selected completion, so no compute goes to padding-only columns.
    """
    index = torch.as_tensor(rows, device=batch.prompt_ids.device) if not isinstance(rows, slice) else rows
    prompt_mask = batch.prompt_mask[index]
    completion_mask = batch.completion_mask[index]
    first_prompt_column = int((prompt_mask.sum(0) > 0).nonzero()[0]) if prompt_mask.any() else 0
    completion_width = max(1, int(completion_mask.sum(1).max()))
    input_ids = torch.cat([batch.prompt_ids[index][:, first_prompt_column:],
                           batch.completion_ids[index][:, :completion_width]], dim=1)
    attention_mask = torch.cat([prompt_mask[:, first_prompt_column:], completion_mask[:, :completion_width]], dim=1)
    return input_ids, attention_mask, completion_width
