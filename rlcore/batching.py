"""Which samples each micro-step sees, and when the optimizer steps (TRL / Unsloth GRPO batch semantics).

With W = ``num_processes`` processes (1 without torchrun) and b = per_device_train_batch_size:

* effective_batch_size = steps_per_generation × W × b
  (= generation_batch_size: completions sampled per generation, over all processes)
* unique prompts per generation = effective_batch_size / num_generations
* a generation is consumed in ``steps_per_generation`` micro-steps; on each process micro-step ``k`` sees that
  process's completions ``[k·b, (k+1)·b)`` (indices into its own share of the generation, see below)
* ``num_iterations`` replays the whole generation: it is used for steps_per_generation × num_iterations
  micro-steps before the next generation
* the optimizer steps after every ``gradient_accumulation_steps`` micro-steps, counted globally, so
  optimizer steps per generation = steps_per_generation × num_iterations / gradient_accumulation_steps

**Shares of a generation (W > 1).** Each process generates, scores and trains on whole groups only (the G
completions of a prompt stay together): :meth:`BatchSchedule.rank_groups`. Number the generation's completions
as one process would hold them (micro-step k of one process of batch W·b sees ``[k·W·b, (k+1)·W·b)``). Let
c = G / gcd(b, G), the fewest micro-steps whose b·c completions are whole groups (steps_per_generation must be
a multiple of c). The generation is cut into blocks of c single-process micro-steps; process r takes the r-th
b·c completions of every block. So:

* when b is a multiple of G (c = 1), micro-step k of the W processes together sees exactly what micro-step k of
  one process with batch W·b sees: every loss normalisation and every optimizer step equals that run's;
* otherwise every optimizer step still sees the same completions as that run when gradient_accumulation_steps
  is a multiple of c, but they are grouped into micro-steps differently, which only ``loss_type="bnpo"`` (its
  per-micro-step token count) and ``top_entropy_quantile`` (a per-micro-batch quantile) can tell apart.
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
        self.batch_size = config.per_device_train_batch_size  # per process: micro-steps index a process's share
        self.num_processes = config.num_processes
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

    def rank_groups(self, rank: int) -> list[int]:
        """Which groups (positions in the generation's prompt list) process ``rank`` generates and trains on, in
        the order of its share: the r-th b·c completions of every block of c single-process micro-steps (see the
        module docstring). With one process: every group, in order."""
        world = self.num_processes
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank!r} is not allowed: expected 0 <= rank < num_processes ({world})")
        group = self.num_generations
        block = group // math.gcd(self.batch_size, group)  # micro-steps whose completions are whole groups
        if self.steps_per_generation % block:
            raise ValueError(f"steps_per_generation={self.steps_per_generation} × per_device_train_batch_size="
                             f"{self.batch_size} does not hold whole groups of num_generations={group} per process")
        groups_per_rank = block * self.batch_size // group  # in one block
        blocks = self.steps_per_generation // block
        return [start * world * groups_per_rank + rank * groups_per_rank + i
                for start in range(blocks) for i in range(groups_per_rank)]

    def rank_completions(self, rank: int) -> list[int]:
        """Where each completion of process ``rank``'s share sits in the generation as one process holds it
        (group g's completions are ``[g·G, (g+1)·G)``), in the order of the share."""
        group = self.num_generations
        return [g * group + i for g in self.rank_groups(rank) for i in range(group)]

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
    (seed, g), so a resumed run needs no sampler state: every process computes the same generation and keeps
    its own ``rank_groups`` of it (:meth:`BatchSchedule.rank_groups`; None: all of it).
    """

    def __init__(self, dataset_size: int, prompts_per_generation: int, num_generations: int, seed: int,
                 shuffle: bool = True, rank_groups: list[int] | None = None) -> None:
        if dataset_size < prompts_per_generation:
            raise ValueError(f"the dataset has {dataset_size} prompts, fewer than one generation needs "
                             f"({prompts_per_generation} = generation_batch_size / num_generations)")
        self.dataset_size = dataset_size
        self.prompts_per_generation = prompts_per_generation
        self.num_generations = num_generations
        self.seed = seed
        self.shuffle = shuffle
        self.generations_per_epoch = dataset_size // prompts_per_generation
        if rank_groups is not None and not all(0 <= g < prompts_per_generation for g in rank_groups):
            raise ValueError(f"rank_groups={rank_groups!r} is not allowed: expected positions below "
                             f"prompts_per_generation ({prompts_per_generation})")
        self.rank_groups = None if rank_groups is None else list(rank_groups)

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
        """Dataset row of every completion this process generates (each prompt repeated num_generations times):
        the whole generation with one process, this process's groups of it with several."""
        prompts = self.prompt_indices(generation)
        if self.rank_groups is not None:
            prompts = [prompts[g] for g in self.rank_groups]
        return [i for i in prompts for _ in range(self.num_generations)]
