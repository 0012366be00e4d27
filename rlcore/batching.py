"""Which samples each micro-step sees, and when the optimizer steps (TRL / Unsloth GRPO batch semantics).

With one process (``num_processes`` = 1 here; the formulas keep the factor for multi-GPU):

* effective_batch_size = steps_per_generation × num_processes × per_device_train_batch_size
  (= generation_batch_size: completions sampled per generation)
* unique prompts per generation = effective_batch_size / num_generations
* a generation is consumed in ``steps_per_generation`` micro-steps; micro-step ``k`` of it sees completions
  ``[k·b, (k+1)·b)`` where b = per_device_train_batch_size
* ``num_iterations`` replays the whole generation: it is used for steps_per_generation × num_iterations
  micro-steps before the next generation
* the optimizer steps after every ``gradient_accumulation_steps`` micro-steps, counted globally, so
  optimizer steps per generation = steps_per_generation × num_iterations / gradient_accumulation_steps
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rlcore.config import GRPOConfig


@dataclass(frozen=True)
class MicroStep:
    """One forward/backward pass over a slice of the current generation."""

    index: int  # global micro-step counter, from 0
    generation: int  # which generation (rollout batch) it reads
    iteration: int  # replay number within the generation, 0 .. num_iterations-1
    slice_index: int  # 0 .. steps_per_generation-1
    sample_indices: tuple[int, ...]  # completions of the generation batch it trains on
    new_generation: bool  # True when a new rollout batch must be generated before this micro-step
    optimizer_step: bool  # True when the optimizer steps after this micro-step


class BatchSchedule:
    """The micro-step plan for a run: pure bookkeeping, no tensors."""

    def __init__(self, config: GRPOConfig) -> None:
        self.batch_size = config.per_device_train_batch_size * config.num_processes
        self.steps_per_generation = config.steps_per_generation
        self.num_iterations = config.num_iterations
        self.accumulation = config.gradient_accumulation_steps
        self.num_generations = config.num_generations
        self.generation_batch_size = config.generation_batch_size
        self.prompts_per_generation = config.prompts_per_generation

    @property
    def micro_steps_per_generation(self) -> int:
        return self.steps_per_generation * self.num_iterations

    @property
    def optimizer_steps_per_generation(self) -> float:
        return self.micro_steps_per_generation / self.accumulation

    def micro_step(self, index: int) -> MicroStep:
        generation, within = divmod(index, self.micro_steps_per_generation)
        iteration, slice_index = divmod(within, self.steps_per_generation)
        start = slice_index * self.batch_size
        return MicroStep(
            index=index,
            generation=generation,
            iteration=iteration,
            slice_index=slice_index,
            sample_indices=tuple(range(start, start + self.batch_size)),
            new_generation=within == 0,
            optimizer_step=(index + 1) % self.accumulation == 0,
        )

    def micro_steps_for_optimizer_step(self, step: int) -> list[MicroStep]:
        """The micro-steps whose gradients optimizer step ``step`` (from 0) applies."""
        first = step * self.accumulation
        return [self.micro_step(i) for i in range(first, first + self.accumulation)]

    def total_optimizer_steps(self, dataset_size: int, max_steps: int, num_train_epochs: float) -> int:
        """``max_steps`` when set (> 0), else the steps that ``num_train_epochs`` passes over the prompts take."""
        if max_steps > 0:
            return max_steps
        generations_per_epoch = dataset_size // self.prompts_per_generation
        if generations_per_epoch == 0:
            raise ValueError(f"the dataset has {dataset_size} prompts, fewer than one generation needs "
                             f"({self.prompts_per_generation} = generation_batch_size / num_generations)")
        micro_steps = generations_per_epoch * self.micro_steps_per_generation
        return max(1, math.ceil(num_train_epochs * micro_steps / self.accumulation))


class PromptSampler:
    """Chooses the unique prompts of each generation: a fresh seeded permutation per epoch, whole chunks only.

    Generation ``g`` takes ``prompts_per_generation`` prompt indices; each is repeated ``num_generations``
    times consecutively, so completions ``[i·G, (i+1)·G)`` form the group of prompt ``i``. Deterministic in
    (seed, g), so a resumed run needs no sampler state.
    """

    def __init__(self, dataset_size: int, prompts_per_generation: int, num_generations: int, seed: int,
                 shuffle: bool = True) -> None:
        if dataset_size < prompts_per_generation:
            raise ValueError(f"the dataset has {dataset_size} prompts, fewer than one generation needs "
                             f"({prompts_per_generation} = generation_batch_size / num_generations)")
        self.dataset_size = dataset_size
        self.prompts_per_generation = prompts_per_generation
        self.num_generations = num_generations
        self.seed = seed
        self.shuffle = shuffle
        self.generations_per_epoch = dataset_size // prompts_per_generation

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.dataset_size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)

    def prompt_indices(self, generation: int) -> list[int]:
        """The unique prompt indices of generation ``generation``."""
        epoch, chunk = divmod(generation, self.generations_per_epoch)
        start = chunk * self.prompts_per_generation
        return [int(i) for i in self._order(epoch)[start:start + self.prompts_per_generation]]

    def completion_rows(self, generation: int) -> list[int]:
        """Dataset row of every completion in the generation batch (each prompt repeated num_generations times)."""
        return [i for i in self.prompt_indices(generation) for _ in range(self.num_generations)]
