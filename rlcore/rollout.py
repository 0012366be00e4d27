"""The rollout-engine interface: what every generator (vLLM, transformers) gives the trainer.

An engine turns tokenised prompts into completions with the per-token log-probabilities under which each
token was *sampled* (after temperature / top-k / top-p / min-p, as the engine sampled it). The trainer uses
those for truncated importance sampling and to report the train/inference mismatch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling knobs, named as in GRPOConfig / vLLM's SamplingParams."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    greedy: bool = False  # evaluation: argmax decoding, logprobs still reported


@dataclass
class Rollout:
    """One completion of one prompt."""

    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    logprobs: list[float]  # one per completion token, log p(token) as sampled by the engine
    finish_reason: str  # "stop" (eos / stop token) or "length" (hit max_tokens)
    extras: dict = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True)
class StandbyStats:
    """What one :meth:`RolloutEngine.sleep` or :meth:`RolloutEngine.wake` did."""

    seconds: float = 0.0
    freed_bytes: int = 0  # sleep: generation-only memory released, by the engine's own account
    device_freed_bytes: int | None = None  # sleep: growth of the device's free memory, where measured
    # where the seconds went (engines that measure it): sleep = reset_prefix_cache + unmap; wake = empty_cache
    # (handing the trainer's cached blocks back, only when the device lacks room) + map
    reset_prefix_cache_seconds: float = 0.0
    unmap_seconds: float = 0.0
    empty_cache_seconds: float = 0.0
    map_seconds: float = 0.0

    @property
    def freed_gib(self) -> float:
        return self.freed_bytes / 2**30


@dataclass(frozen=True)
class SyncStats:
    """What one :meth:`RolloutEngine.sync_weights` did."""

    seconds: float = 0.0
    bytes: int = 0  # copied into the engine
    tensors: int = 0


class RolloutEngine(abc.ABC):
    """Generates completions. Implementations: :class:`rlcore.hf_engine.HFEngine`, ``VLLMEngine``."""

    name: str = "engine"

    @abc.abstractmethod
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> list[Rollout]:
        """One :class:`Rollout` per prompt, in order. Repeat prompts to get several completions each."""

    def sleep(self) -> StandbyStats:
        """Releases generation-only memory (KV cache) before training."""
        return StandbyStats()

    def wake(self) -> StandbyStats:
        """Re-acquires what :meth:`sleep` released, before the next generation."""
        return StandbyStats()

    def sync_weights(self) -> SyncStats:
        """Makes the next generation use the trainer's current LoRA weights."""
        return SyncStats()

    def close(self) -> None:
        """Frees the engine's resources."""
