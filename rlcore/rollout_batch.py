"""The contract between making a batch and the loss: one generation's rollouts as padded tensors.

:class:`RolloutBatch` is built once per generation (:meth:`RolloutBatch.from_rollouts`) and then only read:
its :attr:`~RolloutBatch.loss_mask` is the final mask of the loss (built here, nowhere else), the
importance-sampling weights have one shape (``[N, C]``), and what making it cost is typed
(:class:`RolloutTimings`, the engine's :class:`~rlcore.rollout.StandbyStats`). :meth:`RolloutBatch.micro_batch`
hands the loss the rows of one micro-step, cut to their longest completion.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlcore.loss import loss_mask as build_loss_mask
from rlcore.rollout import Rollout, StandbyStats


@dataclass
class RolloutTimings:
    """Seconds spent making one generation's batch."""

    generate: float = 0.0
    standby: float = 0.0  # waking the engine before generating + putting it back to sleep after
    reward: float = 0.0
    reference: float = 0.0  # old-policy / reference log-probs and the importance-sampling weights
    reward_by_function: dict[str, float] = field(default_factory=dict)  # reward name → its share of ``reward``

    def add(self, other: RolloutTimings) -> RolloutTimings:
        """Both together (the time split of an optimizer step that made several generations)."""
        by_function = dict(self.reward_by_function)
        for name, seconds in other.reward_by_function.items():
            by_function[name] = by_function.get(name, 0.0) + seconds
        return RolloutTimings(self.generate + other.generate, self.standby + other.standby,
                              self.reward + other.reward, self.reference + other.reference, by_function)


@dataclass
class RoundCompletions:
    """What one sampling round made, before it becomes (part of) a :class:`RolloutBatch`: the completions of
    ``row_ids`` (each prompt row repeated ``num_generations`` times) and, once scored, their rewards.

    With dynamic sampling a generation's batch takes groups from several rounds; without it, from one."""

    row_ids: list[int]
    rollouts: list[Rollout]
    generate_seconds: float
    prompts_truncated: int  # prompts cut to max_prompt_length in this round
    scores: Any = None  # rewards.RewardScores, set when the round is scored
    completions: list[Any] = field(default_factory=list)  # what the rewards saw (text, or chat messages)
    reward_seconds: float = 0.0


@dataclass
class MicroBatch:
    """The rows of one micro-step, every per-token tensor cut to ``width`` (their longest completion)."""

    input_ids: torch.Tensor  # [B, P' + width]: left-padded prompt ‖ right-padded completion
    attention_mask: torch.Tensor  # [B, P' + width]
    width: int
    loss_mask: torch.Tensor  # [B, width]
    advantages: torch.Tensor  # [B]
    truncated: torch.Tensor  # [B] bool
    sampling_logps: torch.Tensor  # [B, width]
    old_logps: torch.Tensor | None  # [B, width]
    ref_logps: torch.Tensor | None  # [B, width]
    is_weights: torch.Tensor | None  # [B, width]

    @property
    def active_tokens(self) -> int:
        return int(self.loss_mask.sum())


@dataclass
class RolloutBatch:
    """One generation: every completion of every prompt, padded. Row ``i`` is completion ``i``.

    ``prompt_ids`` are left-padded and ``completion_ids`` right-padded, so ``prompt ‖ completion`` has all
    completions starting at the same column. N completions, P prompt columns, C completion columns.
    """

    generation: int
    prompt_ids: torch.Tensor  # [N, P]
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C] 1 on completion tokens
    # [N, C] the tokens the loss reads: completion_mask, with every token of a truncated completion dropped when
    # mask_truncated_completions (rlcore.loss.loss_mask); the importance weights and mismatch use it too
    loss_mask: torch.Tensor
    sampling_logps: torch.Tensor  # [N, C] as the engine sampled
    truncated: torch.Tensor  # [N] bool
    advantages: torch.Tensor  # [N]
    old_logps: torch.Tensor | None = None  # [N, C] policy at generation time (off-policy replays, IS correction)
    ref_logps: torch.Tensor | None = None  # [N, C] adapter disabled (beta > 0)
    # [N, C] truncated importance-sampling correction; sequence-level modes repeat a completion's weight along C
    is_weights: torch.Tensor | None = None
    # engine vs trainer log-probs of the sampled tokens at generation time (logp_diff_mean / _max, kl), once
    mismatch: dict[str, float] = field(default_factory=dict)
    timings: RolloutTimings = field(default_factory=RolloutTimings)
    wake: StandbyStats = field(default_factory=StandbyStats)
    sleep: StandbyStats = field(default_factory=StandbyStats)
    metrics: dict[str, Any] = field(default_factory=dict)  # rewards, advantages, lengths: logged as they are

    @classmethod
    def from_rollouts(cls, generation: int, rollouts: list[Rollout], advantages: torch.Tensor, pad_token_id: int,
                      device: torch.device, mask_truncated_completions: bool = False,
                      excluded_rows: Sequence[int] = ()) -> RolloutBatch:
        """Pads ``rollouts`` and builds the loss mask; ``advantages`` is ``[N]``, one per rollout.

        ``excluded_rows`` are rows the loss must not read at all (dynamic sampling's filler groups, see
        :mod:`rlcore.dynamic_sampling`): their loss-mask rows are zero.
        """
        if advantages.shape != (len(rollouts),):
            raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({len(rollouts)},)")
        excluded = sorted(set(excluded_rows))
        if excluded and not 0 <= excluded[0] <= excluded[-1] < len(rollouts):
            raise ValueError(f"excluded_rows {excluded} are not rows of a batch of {len(rollouts)}")
        prompt_ids, prompt_mask, completion_ids, completion_mask, sampling_logps, truncated = pad_rollouts(
            rollouts, pad_token_id, device)
        mask = build_loss_mask(completion_mask, truncated, mask_truncated_completions)
        if excluded:
            keep = torch.ones(len(rollouts), dtype=mask.dtype)
            keep[excluded] = 0
            mask = mask * keep.to(mask.device).unsqueeze(1)
        return cls(generation, prompt_ids, prompt_mask, completion_ids, completion_mask, mask, sampling_logps,
                   truncated, advantages.to(device))

    @property
    def size(self) -> int:
        return self.completion_ids.shape[0]

    def set_importance_weights(self, weights: torch.Tensor) -> None:
        """Stores ``[N, C]`` weights, or ``[N, 1]`` ones (sequence-level) repeated along C."""
        if weights.shape not in ((self.size, 1), tuple(self.completion_ids.shape)):
            raise ValueError(f"importance weights have shape {tuple(weights.shape)}, expected ({self.size}, 1) or "
                             f"{tuple(self.completion_ids.shape)}")
        self.is_weights = weights.expand_as(self.completion_ids).contiguous()

    @functools.cached_property
    def row_counts(self) -> RowCounts:
        """Per-row lengths and loss-token counts as host integers, read from the device once per batch: the
        micro-steps' trimming, token counts and learning-signal checks then never wait for the device."""
        counts = torch.stack([self.prompt_mask.sum(1), self.completion_mask.sum(1), self.loss_mask.sum(1),
                              (self.advantages != 0).long()]).long().cpu().tolist()
        return RowCounts(prompt=counts[0], completion=counts[1], loss=counts[2], nonzero_advantage=counts[3])

    def active_tokens(self, rows: Sequence[int]) -> int:
        """Tokens the loss reads in ``rows``."""
        loss = self.row_counts.loss
        return sum(loss[i] for i in rows)

    def has_learning_signal(self, rows: Sequence[int]) -> bool:
        """Whether some row of ``rows`` has a non-zero advantage and tokens the loss reads."""
        counts = self.row_counts
        return any(counts.nonzero_advantage[i] and counts.loss[i] for i in rows)

    def micro_batch(self, rows: Sequence[int]) -> MicroBatch:
        rows = list(rows)
        index = row_index(rows, self.prompt_ids.device)
        input_ids, attention_mask, width = trimmed_inputs(self, rows)

        def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[index][:, :width]

        return MicroBatch(input_ids=input_ids, attention_mask=attention_mask, width=width,
                          loss_mask=take(self.loss_mask), advantages=self.advantages[index],
                          truncated=self.truncated[index], sampling_logps=take(self.sampling_logps),
                          old_logps=take(self.old_logps), ref_logps=take(self.ref_logps),
                          is_weights=take(self.is_weights))

    def record_policy_logps(self, rows: Sequence[int], logps: torch.Tensor) -> None:
        """Stores the policy's log-probs of ``rows`` (``[len(rows), width]``, detached) as ``old_logps``: the
        on-policy path, where the training forward's own values are the old policy's."""
        if self.old_logps is None:
            self.old_logps = torch.zeros_like(self.sampling_logps)
        self.old_logps[row_index(list(rows), self.old_logps.device), : logps.shape[1]] = logps.detach().float()

    # ------------------------------------------------------------------ checkpoints (plain data only)
    def to_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                value = value.cpu()
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            state[item.name] = value
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> RolloutBatch:
        typed = {"timings": RolloutTimings, "wake": StandbyStats, "sleep": StandbyStats}
        values = {}
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            elif name in typed and isinstance(value, dict):
                value = typed[name](**value)
            values[name] = value
        return cls(**values)


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


@dataclass(frozen=True)
class RowCounts:
    """Host copies of per-row counts of a :class:`RolloutBatch` (see :attr:`RolloutBatch.row_counts`)."""

    prompt: list[int]  # prompt tokens (left-padded: the prompt occupies the last ``prompt[i]`` columns)
    completion: list[int]  # completion tokens (right-padded: the first ``completion[i]`` columns)
    loss: list[int]  # tokens the loss reads
    nonzero_advantage: list[int]  # 1 where the advantage is not 0


def row_index(rows: Sequence[int], device: torch.device) -> slice | torch.Tensor:
    """What selects ``rows`` of a tensor: a slice when they are consecutive (a view, nothing copied to the
    device), else an index tensor."""
    rows = list(rows)
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.as_tensor(rows, dtype=torch.long, device=device)


def trimmed_inputs(batch: RolloutBatch, rows: Sequence[int] | slice) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``input_ids``/``attention_mask`` of the selected rows with all-padding columns cut off both ends.

    Returns (input_ids, attention_mask, completion_width): the completion part keeps only as many columns as
    the longest selected completion, so no compute goes to padding-only columns. The widths come from the
    batch's host-side :attr:`~RolloutBatch.row_counts`, so nothing here waits for the device.
    """
    if isinstance(rows, slice):
        rows = range(batch.size)[rows]
    rows = list(rows)
    index = row_index(rows, batch.prompt_ids.device)
    counts = batch.row_counts
    longest_prompt = max(counts.prompt[i] for i in rows)
    first_prompt_column = batch.prompt_ids.shape[1] - longest_prompt if longest_prompt else 0
    completion_width = max(1, max(counts.completion[i] for i in rows))
    prompt_mask = batch.prompt_mask[index]
    completion_mask = batch.completion_mask[index]
    input_ids = torch.cat([batch.prompt_ids[index][:, first_prompt_column:],
                           batch.completion_ids[index][:, :completion_width]], dim=1)
    attention_mask = torch.cat([prompt_mask[:, first_prompt_column:], completion_mask[:, :completion_width]], dim=1)
    return input_ids, attention_mask, completion_width
