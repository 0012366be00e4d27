"""GRPOTrainer: the RL loop. One optimizer step reads generate → score → advantages → loss → update."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from rlcore import checkpoint as checkpoints
from rlcore import distributed
from rlcore.advantages import group_advantages
from rlcore.batching import BatchSchedule, MicroStep, PromptSampler
from rlcore.config import GRPOConfig, ModelConfig
from rlcore.dataset_rows import is_conversational, load_rows, prompt_token_ids, validate_rows
from rlcore.dynamic_sampling import SamplingRound, fill_generation
from rlcore.kernels import offload_activations
from rlcore.kernels.fp16_stability import DynamicLossScaler
from rlcore.logprobs import completion_logprobs
from rlcore.loss import LossSettings, grpo_loss, importance_sampling_correction, sampler_mismatch
from rlcore.model import Policy, has_float16_weights, load_policy, policy_from_module
from rlcore.output_dir import prepare_output_dir
from rlcore.reporting import RunReporter, SilentReporter
from rlcore.rewards import RewardFunction, as_reward_function, score_completions
from rlcore.rollout import RolloutEngine, SamplingSettings
from rlcore.rollout_batch import RolloutBatch, RolloutTimings, RoundCompletions, row_index, trimmed_inputs

logger = logging.getLogger("rlcore")

StepCallback = Callable[["GRPOTrainer", int, dict[str, Any]], None]


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""


class GRPOTrainer:
    """Trains a LoRA policy with GRPO / GSPO.

    Args mirror TRL's ``GRPOTrainer``: ``model`` is a model id / local path / ``"tiny"``, a
    :class:`ModelConfig`, or an already built transformers/PEFT model (then ``processing_class`` is its
    tokenizer); ``reward_funcs`` are :class:`RewardFunction` instances or plain functions
    ``f(prompts, completions, **columns) -> list[float]``; ``train_dataset`` rows have a ``prompt`` (string or
    chat messages) and any columns the rewards read.
    """

    # True: score the old policy in a separate no-grad pass even when the batch is on-policy, as rlcore first
    # did (benchmarks/rl_step.py times both; tests check they agree)
    _separate_old_logps_pass = False

    def __init__(
        self,
        model: str | ModelConfig | torch.nn.Module,
        processing_class: Any = None,
        reward_funcs: RewardFunction | Callable | Sequence[RewardFunction | Callable] = (),
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        *,
        model_config: ModelConfig | None = None,
        engine: RolloutEngine | None = None,
        callbacks: Sequence[StepCallback] = (),
        show_progress: bool = True,
    ) -> None:
        self.args = args if args is not None else GRPOConfig()
        # this process's rank; with several (torchrun) joins the process group and takes its GPU before any load
        self.ranks = distributed.setup(self.args.num_processes, self.args.ddp_timeout)
        _seed_everything(self.args.seed)  # the LoRA initialisation draws from the global RNG
        self.policy = _build_policy(model, processing_class, model_config, engine, self.args)
        self.model, self.tokenizer, self.engine = self.policy.model, self.policy.tokenizer, self.policy.engine
        self.device = next(p.device for p in self.model.parameters())
        if callable(reward_funcs) and not isinstance(reward_funcs, (list, tuple)):
            reward_funcs = [reward_funcs]
        self.rewards = [as_reward_function(r) for r in reward_funcs]
        if not self.rewards:
            raise ValueError("reward_funcs is empty: pass at least one RewardFunction or reward function")
        if self.args.reward_weights is not None and len(self.args.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.args.reward_weights)} entries for "
                             f"{len(self.rewards)} reward functions")
        required = {}
        for reward in self.rewards:
            required.update(reward.required_columns)
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        self.train_rows = load_rows(train_dataset, "train_dataset")
        validate_rows(self.train_rows, required, "train_dataset")
        self.eval_rows = None
        if eval_dataset is not None:
            self.eval_rows = load_rows(eval_dataset, "eval_dataset")
            validate_rows(self.eval_rows, required, "eval_dataset")
        self.schedule = BatchSchedule(self.args)
        self.sampler = PromptSampler(len(self.train_rows), self.args.prompts_per_generation,
                                     self.args.num_generations, self.args.seed, self.args.shuffle_dataset,
                                     rank_groups=self.schedule.rank_groups(self.ranks.rank)
                                     if self.ranks.distributed else None)
        self.total_steps = self.schedule.total_optimizer_steps(len(self.train_rows), self.args.max_steps,
                                                               self.args.num_train_epochs)
        # RolloutBatch.loss_mask already drops truncated completions: the loss reads it as its final mask
        self.loss_settings = dataclasses.replace(LossSettings.from_config(self.args), mask_truncated_completions=False)
        self.callbacks = list(callbacks)
        self.show_progress = show_progress
        self.stop_tokens = _stop_token_ids(self.tokenizer)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters (expected LoRA adapters)")
        self.optimizer = _make_optimizer(self.trainable, self.args)
        from transformers import get_scheduler

        self.lr_scheduler = get_scheduler(self.args.lr_scheduler_type, self.optimizer,
                                          num_warmup_steps=math.ceil(self.args.warmup_ratio * self.total_steps),
                                          num_training_steps=self.total_steps)
        self._prompt_cache: dict[tuple[str, int], tuple[list[int], bool]] = {}  # (split, row) → ids, truncated
        self._nonfinite_in_step: bool | torch.Tensor = False  # a device flag while the step runs (no sync)
        # float16 weights: 16-bit gradients underflow without scaling the loss (kernels/fp16_stability.py)
        self.loss_scaler = DynamicLossScaler() if has_float16_weights(self.model) else None
        self._consecutive_nonfinite = 0
        self._skipped_steps = 0
        self._warned_dead_update = False
        self.step = 0
        self.buffers: dict[int, RolloutBatch] = {}  # generation index → its rollouts
        self._rank_loss_scales: dict[int, float] = {}  # micro-step index → distributed.loss_scale (several ranks)
        self._combined_metric_keys: set[str] = set()  # several ranks: the step metrics already the job's
        self.ranks.broadcast_parameters(self.trainable, "the adapter's initial weights")

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from_checkpoint: bool | str | None = None) -> dict[str, Any]:
        """Runs to ``total_steps`` optimizer steps; returns a summary (final metrics, output paths, and
        ``steps_run``: how many steps this call ran, after ``first_step`` restored from a checkpoint).

        One run per ``output_dir`` (:mod:`rlcore.output_dir`): a new run refuses a non-empty one unless
        ``overwrite_output_dir``; ``resume_from_checkpoint=True`` resumes the newest checkpoint there and fails
        when there is none, as TRL does; a path resumes that checkpoint.
        """
        args = self.args
        _seed_everything(distributed.process_seed(args.seed, self.ranks.rank))
        # rank 0 alone checks and tidies output_dir (it may move a damaged checkpoint aside); every rank resumes
        resume_path = self.ranks.run_on_main("the check of output_dir", lambda: prepare_output_dir(
            args.output_dir, resume_from_checkpoint, args.overwrite_output_dir))
        if resume_path:
            self._restore(resume_path)
        first_step = self.step
        reporter = RunReporter(args.output_dir, self.total_steps, self.step, args.report_to, args.logging_steps,
                               {"grpo": args.to_dict()}, self.show_progress) if self.ranks.is_main \
            else SilentReporter(args.output_dir)
        if resume_path:
            reporter.message(f"resumed from {resume_path} at step {self.step}")
        self.model.train()
        metrics: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            if self.eval_rows is not None and self.step == 0:
                reporter.log(0, self.evaluate())  # step 0: where the evaluation curve starts, before any update
            while self.step < self.total_steps:
                metrics = self.training_step(self.step)
                self.step += 1
                if self.eval_rows is not None and args.eval_steps and self.step % args.eval_steps == 0:
                    metrics.update(self.evaluate())
                metrics = self._job_metrics(metrics)
                reporter.log(self.step, metrics)
                if self.step % args.save_steps == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self, self.step, metrics)
        except BaseException as error:
            self.ranks.fail(error)  # several ranks: the others stop within milliseconds instead of waiting
            raise
        finally:
            plot = reporter.close()
        return {"steps": self.step, "steps_run": self.step - first_step, "first_step": first_step,
                "resumed_from": resume_path, "seconds": time.perf_counter() - started, "final_metrics": metrics,
                "output_dir": args.output_dir, "metrics_file": reporter.path, "plot": plot,
                "checkpoint": checkpoints.list_checkpoints(args.output_dir)[-1:] or None,
                "skipped_steps": self._skipped_steps}

    def training_step(self, step: int) -> dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-steps; returns its metrics."""
        micro_steps = self.schedule.micro_steps_for_optimizer_step(step)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # peak_memory_gib is per step
        made = RolloutTimings()  # of the generations made for this step (none when it replays a buffered one)
        for generation in sorted({micro.generation for micro in micro_steps}):
            if generation not in self.buffers:
                self.buffers = {g: b for g, b in self.buffers.items() if g >= micro_steps[0].generation}
                batch = self.make_rollout_batch(generation)  # generate → score → advantages
                self.buffers[generation] = batch
                made = made.add(batch.timings)
        # "dapo" divides by the active tokens of every micro-batch of this optimizer step
        items = sum(self.buffers[micro.generation].active_tokens(micro.sample_indices) for micro in micro_steps)
        learning_signal = any(self._has_learning_signal(micro) for micro in micro_steps)
        items, learning_signal = self._global_step_counts(step, micro_steps, items, learning_signal)
        start = time.perf_counter()
        micro_metrics, trained_tokens = [], 0
        for micro in micro_steps:
            values, tokens = self.micro_step(micro, items)  # loss → backward
            micro_metrics.append(values)
            trained_tokens += tokens
        self._average_gradients(step)  # several ranks: one all-reduce, then every rank applies the same update
        micro_metrics = self._job_micro_metrics(step, micro_metrics)  # several ranks: each micro-step's, over all
        update = self.optimizer_step()  # update
        train_seconds = time.perf_counter() - start
        sync_seconds = self.engine.sync_weights().seconds if update["applied"] else 0.0
        self._check_dead_update(update, learning_signal)
        return self._step_metrics(micro_metrics, update, made, train_seconds, sync_seconds, trained_tokens,
                                  self.buffers[micro_steps[-1].generation])

    # ------------------------------------------------------------------ generate → score → advantages
    def make_rollout_batch(self, generation: int) -> RolloutBatch:
        """Generates generation ``generation``'s completions, scores them and computes the advantages.

        With ``dynamic_sampling`` the completions are scored while the engine is still awake, groups whose
        rewards all tie are replaced by completions of further prompts (:mod:`rlcore.dynamic_sampling`), and
        the reward metrics cover every completion generated; otherwise the engine sleeps before the rewards run.
        """
        args = self.args
        prompt_rows = self.sampler.completion_rows(generation)[::args.num_generations]
        wake = self.engine.wake()
        first = self._generate_round(generation, 0, prompt_rows)
        if args.dynamic_sampling:
            selection = fill_generation(
                self._score_round(first), len(prompt_rows), args.num_generations, args.dynamic_sampling_max_retries,
                len(self.train_rows), self._dynamic_sampling_key(generation),
                lambda k, rows: self._score_round(self._generate_round(generation, k, rows)))
            rounds, groups, excluded = selection.rounds, selection.groups, selection.excluded
        else:
            rounds, groups, excluded = [first], [(0, g) for g in range(len(prompt_rows))], []
        sleep = self.engine.sleep()
        if not args.dynamic_sampling:
            self._score_round(first)

        size = args.num_generations
        rollouts, completions, rewards = [], [], []
        for round_index, group in groups:
            taken = slice(group * size, (group + 1) * size)
            completions_made = rounds[round_index].payload
            rollouts += completions_made.rollouts[taken]
            completions += completions_made.completions[taken]
            rewards.append(rounds[round_index].rewards[taken])
        excluded_rows = [place * size + i for place in excluded for i in range(size)]
        rewards = torch.as_tensor(np.concatenate(rewards), dtype=torch.float32)
        rewards[excluded_rows] = float("nan")  # filler groups: advantage 0, and no part in the batch's std
        advantages, advantage_stats = self._advantages(generation, rewards)  # several ranks: over all of them
        batch = RolloutBatch.from_rollouts(generation, rollouts, advantages, self.tokenizer.pad_token_id, self.device,
                                           mask_truncated_completions=args.mask_truncated_completions,
                                           excluded_rows=excluded_rows)
        batch.wake, batch.sleep = wake, sleep

        start = time.perf_counter()
        self._add_reference_logps(batch)
        made = [sampling_round.payload for sampling_round in rounds]
        scores = _concatenate_scores([m.scores for m in made])  # every completion generated
        generate_seconds = sum(m.generate_seconds for m in made)
        batch.timings = RolloutTimings(generate=generate_seconds, standby=wake.seconds + sleep.seconds,
                                       reward=sum(m.reward_seconds for m in made),
                                       reference=time.perf_counter() - start, reward_by_function=dict(scores.seconds))
        reward_metrics = _reward_metrics(self._job_scores(generation, scores), rewards)  # every rank's
        completion_tokens = sum(batch.row_counts.completion)
        generated_tokens = sum(len(r.completion_ids) for m in made for r in m.rollouts)
        batch.metrics.update({
            # per-reward seconds are reported from batch.timings, only by the step that made the batch
            **{k: v for k, v in reward_metrics.items() if not k.startswith("time_reward/")},
            **{f"advantage_{k}": float(v) for k, v in advantage_stats.items()},
            **_length_metrics(batch),
            "prompts_truncated": sum(m.prompts_truncated for m in made),
            "completion_tokens": completion_tokens,
            "generated_tokens": generated_tokens,
            "generation_tokens_per_second": generated_tokens / max(generate_seconds, 1e-9),
        })
        if args.dynamic_sampling:
            batch.metrics.update(selection.metrics)
        if args.log_completions:
            batch.metrics["sample_completion"] = str(completions[0])[:500]
        return batch

    def _generate_round(self, generation: int, round_index: int, prompt_rows: list[int]) -> SamplingRound:
        """Completions of ``prompt_rows`` (each ``num_generations`` times) from the engine, not yet scored."""
        args = self.args
        row_ids = [i for i in prompt_rows for _ in range(args.num_generations)]
        encoded = [self._encode_prompt("train", i, self.train_rows[i]["prompt"]) for i in row_ids]
        seed = args.seed * 100_003 + generation
        if round_index:  # dynamic sampling's further rounds: their own seeded stream
            seed = int(np.random.default_rng([*self._dynamic_sampling_key(generation), round_index]).integers(2**31))
        start = time.perf_counter()
        rollouts = self.engine.generate([ids for ids, _ in encoded], self.sampling_settings(seed=seed))
        made = RoundCompletions(row_ids=row_ids, rollouts=rollouts, generate_seconds=time.perf_counter() - start,
                                prompts_truncated=sum(t for _, t in encoded) // args.num_generations)
        return SamplingRound(list(prompt_rows), np.empty(0), made)

    def _score_round(self, sampling_round: SamplingRound) -> SamplingRound:
        """Runs the rewards on a round's completions; sets its ``rewards`` (the weighted sum per completion)."""
        made: RoundCompletions = sampling_round.payload
        start = time.perf_counter()
        rows = [self.train_rows[i] for i in made.row_ids]
        made.scores, made.completions = self._score(rows, made.rollouts)
        made.reward_seconds = time.perf_counter() - start
        sampling_round.rewards = made.scores.weighted_sum()
        return sampling_round

    def _dynamic_sampling_key(self, generation: int) -> tuple[int, ...]:
        """Seeds dynamic sampling's extra prompts and sampling of generation ``generation``: deterministic, so a
        resumed run draws the same; a process drawing its own share of the batch adds its index here."""
        return (self.args.seed, generation) + ((self.ranks.rank,) if self.ranks.distributed else ())

    @property
    def _old_logps_from_training_forward(self) -> bool:
        """On-policy batches: every micro-step reading a generation runs before the next optimizer update
        (``gradient_accumulation_steps`` a multiple of ``steps_per_generation × num_iterations``, e.g. the
        default equal settings with one iteration). The old policy is then the policy being trained, and its
        log-probs are the training forward's own, detached: no separate no-grad pass."""
        args = self.args
        on_policy = args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations) == 0
        return on_policy and not self._separate_old_logps_pass

    def _add_reference_logps(self, batch: RolloutBatch) -> None:
        """Old-policy, reference and sampling-correction terms computed once per generation, no grad.

        On-policy (:attr:`_old_logps_from_training_forward`) the old log-probs come from the training forward:
        :meth:`micro_step` records them and computes the correction there."""
        args = self.args
        # Off-policy unless every micro-step reading this generation falls before the same optimizer update.
        uses_per_generation = args.steps_per_generation * args.num_iterations
        needs_old = (args.gradient_accumulation_steps % uses_per_generation != 0
                     or args.vllm_importance_sampling_correction)
        if needs_old and not self._old_logps_from_training_forward:
            batch.old_logps = self._logps_no_grad(batch)
            self._set_sampling_correction(batch)
        if args.beta > 0.0:
            with self.model.disable_adapter():  # the reference is the base model: no second copy of the weights
                batch.ref_logps = self._logps_no_grad(batch)

    def _set_sampling_correction(self, batch: RolloutBatch) -> None:
        """The engine-mismatch importance weights of the whole generation (``vllm_importance_sampling_*``) and
        the train/inference mismatch metrics, from ``batch.old_logps`` (the engine's logprobs vs the trainer's)."""
        args = self.args
        if args.vllm_importance_sampling_correction:
            weights, weight_metrics = importance_sampling_correction(
                batch.old_logps, batch.sampling_logps, batch.loss_mask,
                mode=args.vllm_importance_sampling_mode, clip_min=args.vllm_importance_sampling_clip_min,
                clip_max=args.vllm_importance_sampling_clip_max)
            batch.set_importance_weights(weights)
            mismatch = {k: weight_metrics.pop(k) for k in ("logp_diff_mean", "logp_diff_max", "kl")}
            batch.metrics.update({f"sampling_is_{k}": v for k, v in _floats(weight_metrics).items()})
        else:
            mismatch = sampler_mismatch(batch.old_logps, batch.sampling_logps, batch.loss_mask)
        batch.mismatch = _floats(mismatch)

    @torch.no_grad()
    def _logps_no_grad(self, batch: RolloutBatch) -> torch.Tensor:
        out = torch.zeros_like(batch.sampling_logps)
        size = self.args.per_device_train_batch_size
        for start in range(0, batch.completion_ids.shape[0], size):
            rows = list(range(start, min(start + size, batch.completion_ids.shape[0])))
            input_ids, attention_mask, width = trimmed_inputs(batch, rows)
            logps = completion_logprobs(self.model, input_ids, attention_mask, width, self.args.temperature,
                                        self.args.logprob_chunk_size, packed=self.args.padding_free)
            out[row_index(rows, out.device), :width] = logps.float()
        return out

    # ------------------------------------------------------------------ loss
    def micro_step(self, micro: MicroStep, items_in_step: int) -> tuple[dict[str, Any], int]:
        """Forward, loss and backward on one slice of a generation; returns its metrics and token count.

        Nothing here waits for the device: the metrics are 0-dim tensors (:meth:`_step_metrics` reads them all
        at once), the token count comes from the batch's host-side row counts, and a NaN/inf loss is recorded
        as a device flag that :meth:`optimizer_step` reads (its gradient is NaN/inf too: the update is skipped).
        """
        args = self.args
        batch = self.buffers[micro.generation]
        micro_batch = batch.micro_batch(micro.sample_indices)
        want_entropy = args.top_entropy_quantile < 1.0
        # tensors saved for backward go to host memory as the forward makes them; backward brings them back
        offload = offload_activations() if args.activation_offloading else nullcontext()
        with offload:
            out = completion_logprobs(self.model, micro_batch.input_ids, micro_batch.attention_mask,
                                      micro_batch.width, args.temperature, args.logprob_chunk_size,
                                      return_entropy=want_entropy, packed=args.padding_free)
            logps, entropies = out if want_entropy else (out, None)
        logps = logps.float()
        old, weights = micro_batch.old_logps, micro_batch.is_weights
        if self._old_logps_from_training_forward:
            # grpo_loss takes old=None as logps.detach(); the engine-mismatch weights of these rows come from the
            # same values (a micro-step holds whole rows, so a sequence-level weight sees its whole completion)
            old = None
            batch.record_policy_logps(micro.sample_indices, logps)
            if args.vllm_importance_sampling_correction:
                weights, _ = importance_sampling_correction(
                    logps.detach(), micro_batch.sampling_logps, micro_batch.loss_mask,
                    mode=args.vllm_importance_sampling_mode, clip_min=args.vllm_importance_sampling_clip_min,
                    clip_max=args.vllm_importance_sampling_clip_max)
        loss, metrics = grpo_loss(
            logps, old, micro_batch.ref_logps, micro_batch.advantages,
            micro_batch.loss_mask, settings=self.loss_settings, importance_weights=weights,
            sampling_per_token_logps=micro_batch.sampling_logps, entropies=entropies,
            truncated=micro_batch.truncated, num_items_in_batch=items_in_step,
            gradient_accumulation_steps=args.gradient_accumulation_steps)
        loss = self._rank_scaled(loss, micro)  # several ranks: their averaged gradients equal one process's
        (self.loss_scaler.scale_loss(loss) if self.loss_scaler is not None else loss).backward()
        loss = loss.detach()
        self._nonfinite_in_step = ~torch.isfinite(loss) | self._nonfinite_in_step
        metrics["loss"] = loss
        if args.activation_offloading:
            metrics["activation_offload_gib"] = offload.offloaded_bytes / 2**30
        last_read = micro.iteration == args.num_iterations - 1 and micro.slice_index == args.steps_per_generation - 1
        if self._old_logps_from_training_forward and last_read:
            self._set_sampling_correction(batch)  # every row recorded: the generation's correction and mismatch
        counts = batch.row_counts
        return metrics, sum(counts.prompt[i] + counts.completion[i] for i in micro.sample_indices)

    def _has_learning_signal(self, micro: MicroStep) -> bool:
        """Whether some completion of this micro-step has a non-zero advantage and tokens the loss reads."""
        return self.buffers[micro.generation].has_learning_signal(micro.sample_indices)

    def _check_dead_update(self, update: dict[str, Any], learning_signal: bool) -> None:
        """Warns once per run when the gradient is exactly zero although the advantages say there is something to
        learn: the policy saturated (log-probs of 0, usually after a far too large update) and stopped learning."""
        if not (update["applied"] and update["grad_norm"] == 0.0 and learning_signal) or self._warned_dead_update:
            return
        self._warned_dead_update = True
        logger.warning("step %d: the gradient is exactly 0 although some completions have non-zero advantages: the "
                       "policy is no longer learning (saturated probabilities, typically after too large an update; "
                       "learning_rate is %g). Lower learning_rate or max_grad_norm.", self.step + 1,
                       self.args.learning_rate)

    # ------------------------------------------------------------------ update
    def optimizer_step(self) -> dict[str, Any]:
        """Unscales (float16 weights: dynamic loss scaling), clips and applies the accumulated gradient unless it
        is NaN/inf; then advances the LR schedule.

        With loss scaling, a NaN/inf gradient from a finite loss while the scale is above 1 is the scale's
        overflow: the update is skipped and the scale halved, and it does not count toward
        ``max_consecutive_nonfinite``. A NaN/inf loss, or an overflow at a scale of 1 or less, counts.
        """
        nonfinite_loss, self._nonfinite_in_step = bool(self._nonfinite_in_step), False
        scaler = self.loss_scaler
        finite_gradients = scaler.unscale_(self.trainable) if scaler is not None else True
        if self.args.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.args.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])
        grad_norm = float(grad_norm)
        finite_gradients = finite_gradients and math.isfinite(grad_norm)
        applied = not nonfinite_loss and finite_gradients
        scale_backoff = scaler is not None and not nonfinite_loss and not finite_gradients and scaler.scale > 1.0
        if scaler is not None and not nonfinite_loss:
            scaler.update(finite_gradients)  # halves the scale after an overflow, grows it after a good run
        if applied:
            self.optimizer.step()
            self._consecutive_nonfinite = 0
        elif scale_backoff:
            self._skipped_steps += 1
            logger.info("step %d: gradient overflow at loss scale %g; update skipped, scale now %g", self.step + 1,
                        scaler.scale / scaler.backoff_factor, scaler.scale)
        else:
            self._skipped_steps += 1
            self._consecutive_nonfinite += 1
            logger.warning("step %d: non-finite loss or gradient (grad norm %s); update skipped", self.step + 1,
                           grad_norm)
            if self._consecutive_nonfinite >= self.args.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{self._consecutive_nonfinite} optimizer steps in a row had a NaN/inf loss or gradient "
                    f"(last at step {self.step + 1}); stopping. Lower learning_rate, check the rewards for "
                    "extreme values, or use dtype='bfloat16' instead of float16. The last good checkpoint is in "
                    f"{self.args.output_dir}.")
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        update = {"applied": applied, "grad_norm": grad_norm, "learning_rate": lr}
        if scaler is not None:
            update["loss_scale"] = scaler.scale
        return update

    # ------------------------------------------------------------------ evaluation, sampling, checkpoints
    def sampling_settings(self, seed: int | None = None, greedy: bool = False) -> SamplingSettings:
        args = self.args
        return SamplingSettings(max_tokens=args.max_completion_length, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, min_p=args.min_p or 0.0,
                                repetition_penalty=args.repetition_penalty, stop_token_ids=self.stop_tokens,
                                seed=None if seed is None else distributed.engine_seed(seed, self.ranks.rank),
                                greedy=greedy)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward of one greedy completion per eval prompt."""
        rows = self.eval_rows
        prompt_ids = [self._encode_prompt("eval", i, row["prompt"])[0] for i, row in enumerate(rows)]
        self.engine.wake()
        rollouts = []
        size = self.args.per_device_eval_batch_size
        for start in range(0, len(prompt_ids), size):
            rollouts += self.engine.generate(prompt_ids[start:start + size], self.sampling_settings(greedy=True))
        self.engine.sleep()
        scores, _ = self._score(rows, rollouts)
        metrics = scores.metrics()  # NaN-aware: None rewards do not count
        out = {"eval_reward_mean": metrics["reward_mean"]}
        for name in scores.names:
            out[f"eval_rewards/{name}"] = metrics[f"rewards/{name}/mean"]
        return out

    def _score(self, rows: list[dict[str, Any]], rollouts: list) -> tuple[Any, list[Any]]:
        """Every reward on every completion; completions are chat messages where the prompt was."""
        prompts = [row["prompt"] for row in rows]
        completions = [[{"role": "assistant", "content": r.text}] if is_conversational(p) else r.text
                       for p, r in zip(prompts, rollouts)]
        columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
        columns["completion_ids"] = [r.completion_ids for r in rollouts]  # as TRL passes them
        scores = score_completions(self.rewards, prompts, completions, columns, self.args.reward_weights)
        return scores, completions

    def save_checkpoint(self) -> str:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "rng": checkpoints.capture_rng_state(),
            "buffers": {g: b.to_state() for g, b in self.buffers.items()},
            "consecutive_nonfinite": self._consecutive_nonfinite,
            "skipped_steps": self._skipped_steps,
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
        }
        configs = {"grpo": self.args.to_dict(), "model_path": self.policy.model_path}
        if self.ranks.distributed:  # rank 0 writes every rank's RNG state and rollout buffer
            every = self.ranks.gather_objects({key: state[key] for key in checkpoints.RANK_KEYS},
                                              f"the state of checkpoint-{self.step}")
            state = checkpoints.with_rank_states(state, every) if self.ranks.is_main else state
        return self.ranks.run_on_main(f"writing checkpoint-{self.step}", lambda: checkpoints.save_checkpoint(
            self.args.output_dir, self.step, self.model, self.tokenizer, state, configs, self.args.save_total_limit))

    def _restore(self, path: str) -> None:
        state = checkpoints.load_trainer_state(path)
        own = checkpoints.rank_state(state, self.ranks.rank, self.ranks.world_size, path)  # RNG, rollout buffer
        checkpoints.load_adapter_weights(self.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        checkpoints.restore_rng_state(own["rng"])
        self.buffers = {g: RolloutBatch.from_state(b, self.device) for g, b in own["buffers"].items()}
        self.step = state["step"]
        self._consecutive_nonfinite = state["consecutive_nonfinite"]
        self._skipped_steps = state["skipped_steps"]
        if self.loss_scaler is not None and state.get("loss_scaler") is not None:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        self.engine.sync_weights()

    def _encode_prompt(self, split: str, row: int, prompt: Any) -> tuple[list[int], bool]:
        """Token ids of a dataset row's prompt, tokenised once per run."""
        key = (split, row)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = prompt_token_ids(self.tokenizer, prompt, self.args.max_prompt_length)
        return self._prompt_cache[key]

    def _step_metrics(self, micro_metrics: list[dict[str, Any]], update: dict[str, Any], made: RolloutTimings,
                      train_seconds: float, sync_seconds: float, trained_tokens: int, batch: RolloutBatch
                      ) -> dict[str, Any]:
        """The step's metrics: the micro-steps' loss terms, the update, the generation in use (rewards, lengths,
        mismatch, engine standby) and where the time went (``made``: the generations made for this step)."""
        micro_metrics = _metrics_to_host(micro_metrics)
        keys = {k for m in micro_metrics for k in m}
        metrics: dict[str, Any] = {}
        for key in sorted(keys):
            values = [m[key] for m in micro_metrics if key in m]
            metrics[key] = float(np.max(values)) if key.endswith("_max") else float(np.mean(values))
        metrics["loss"] = float(np.sum([m["loss"] for m in micro_metrics]))
        metrics.update(batch.metrics)
        metrics.update({f"mismatch_{k}": v for k, v in batch.mismatch.items()})
        metrics.update(standby_sleep_seconds=batch.sleep.seconds, standby_wake_seconds=batch.wake.seconds,
                       standby_freed_gib=batch.sleep.freed_gib)
        if batch.sleep.device_freed_bytes is not None:
            metrics["standby_freed_device_gib"] = batch.sleep.device_freed_bytes / 2**30
        metrics.update(standby_reset_prefix_cache_seconds=batch.sleep.reset_prefix_cache_seconds,
                       standby_unmap_seconds=batch.sleep.unmap_seconds,
                       standby_empty_cache_seconds=batch.sleep.empty_cache_seconds + batch.wake.empty_cache_seconds,
                       standby_map_seconds=batch.wake.map_seconds)
        if "loss_scale" in update:
            metrics["loss_scale"] = update["loss_scale"]
        metrics["grad_norm"] = update["grad_norm"]
        metrics["learning_rate"] = update["learning_rate"]
        metrics["update_skipped"] = not update["applied"]
        metrics["skipped_steps_total"] = self._skipped_steps
        timings = {"generate": made.generate, "reward": made.reward, "reference": made.reference,
                   "standby": made.standby, "train": train_seconds, "sync": sync_seconds}
        for key, seconds in timings.items():
            metrics[f"time_{key}"] = seconds
        for name, seconds in made.reward_by_function.items():
            metrics[f"time_reward/{name}"] = seconds
        total = sum(timings.values())
        metrics["time_step"] = total
        metrics["train_tokens_per_second"] = trained_tokens / max(timings["train"], 1e-9)
        generated = 0
        if timings["generate"]:  # dynamic sampling generates more than the batch holds
            generated = batch.metrics.get("generated_tokens", batch.metrics["completion_tokens"])
        metrics["tokens_per_second"] = (trained_tokens + generated) / max(total, 1e-9)
        metrics["peak_memory_gib"] = _peak_memory_gib()
        if torch.cuda.is_available():
            # what the device really holds after training: with vLLM, the allocator peak above also counts
            # vLLM's memory pools, released or not
            free, total = torch.cuda.mem_get_info()
            metrics["device_memory_used_gib"] = (total - free) / 2**30
        return metrics

    # ------------------------------------------------------------------ several processes (torchrun)
    def _advantages(self, generation: int, rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """:func:`group_advantages` of this process's completions (``rewards``: their weighted rewards).

        One process: of ``rewards`` as they are. Several: of the whole generation, every rank's rewards put where
        one process would hold them (:meth:`BatchSchedule.rank_completions`), so the group statistics, the std
        of ``scale_rewards="batch"`` and the logged advantage statistics are the generation's, computed as one
        process computes them; this rank's rows are then taken back out.
        """
        args = self.args
        if not self.ranks.distributed:
            return group_advantages(rewards, args.num_generations, args.scale_rewards)
        every = self.ranks.all_gather_objects(rewards.cpu(), f"the rewards of generation {generation}")
        places = [self.schedule.rank_completions(rank) for rank in range(self.ranks.world_size)]
        whole = torch.empty(sum(len(p) for p in places), dtype=rewards.dtype)
        for rank_places, values in zip(places, every):
            whole[rank_places] = values
        advantages, stats = group_advantages(whole, args.num_generations, args.scale_rewards)
        return advantages[places[self.ranks.rank]].to(rewards.device), stats

    def _job_scores(self, generation: int, scores: Any) -> Any:
        """The reward scores the metrics describe: this process's, or with several ranks every rank's together
        (in the order one process would hold them; in rank order when dynamic sampling made the shares uneven)."""
        if not self.ranks.distributed:
            return scores
        every = self.ranks.all_gather_objects(scores, f"the reward scores of generation {generation}")
        places = [self.schedule.rank_completions(rank) for rank in range(self.ranks.world_size)]
        whole = _concatenate_scores(every)
        if all(len(part.values) == len(p) for part, p in zip(every, places)):
            values = np.empty_like(whole.values)
            for part, rank_places in zip(every, places):
                values[rank_places] = part.values
            whole = dataclasses.replace(whole, values=values)
        return whole

    def _global_step_counts(self, step: int, micro_steps: list[MicroStep], items: int, learning_signal: bool
                            ) -> tuple[int, bool]:
        """The active tokens of the optimizer step (``dapo``/``cispo``'s normaliser) and whether any completion
        has something to learn: this process's, or with several ranks every rank's (one all-reduce, which also
        carries each micro-step's active tokens for ``bnpo``: :func:`rlcore.distributed.loss_scale`)."""
        if not self.ranks.distributed:
            return items, learning_signal
        own = [self.buffers[micro.generation].active_tokens(micro.sample_indices) for micro in micro_steps]
        total = self.ranks.all_reduce_sum([items, float(learning_signal), *own],
                                          f"the token counts of step {step + 1}")
        self._rank_loss_scales = {
            micro.index: distributed.loss_scale(self.args.loss_type, self.ranks.world_size, mine, everyone)
            for micro, mine, everyone in zip(micro_steps, own, total[2:])}
        return int(total[0]), total[1] > 0

    def _rank_scaled(self, loss: torch.Tensor, micro: MicroStep) -> torch.Tensor:
        """``loss`` × this micro-step's :func:`rlcore.distributed.loss_scale` (several ranks; one process: as is)."""
        scale = self._rank_loss_scales.get(micro.index, 1.0)
        return loss if scale == 1.0 else loss * scale

    def _average_gradients(self, step: int) -> None:
        """Several ranks: the LoRA gradients become their mean over ranks, and a NaN/inf loss on any rank marks
        the step non-finite on every rank, so that all of them skip it (one all-reduce). One process: nothing."""
        if self.ranks.distributed:
            self._nonfinite_in_step = self.ranks.average_gradients(
                self.trainable, bool(self._nonfinite_in_step), f"the gradient all-reduce of step {step + 1}")

    def _job_micro_metrics(self, step: int, micro_metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Several ranks: micro-step k's loss terms over every rank's micro-batch k, i.e. those of one process's
        micro-step k (:func:`rlcore.distributed.combine_metrics`: token-weighted means, summed token counts, the
        mean of the ranks' losses, each W times its share). One process: as they are."""
        if not self.ranks.distributed:
            return micro_metrics
        every = self.ranks.all_gather_objects(_metrics_to_host(micro_metrics), f"the loss metrics of step {step + 1}")
        combined = [distributed.combine_metrics([rank[k] for rank in every]) for k in range(len(micro_metrics))]
        self._combined_metric_keys = {key for metrics in combined for key in metrics}
        return combined

    def _job_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The step's metrics for the whole job (:func:`rlcore.distributed.combine_metrics`; the loss terms are
        already the job's, see :meth:`_job_micro_metrics`); one process: as they are."""
        if not self.ranks.distributed:
            return metrics
        every = self.ranks.all_gather_objects(metrics, f"the metrics of step {self.step}")
        return distributed.combine_metrics(every, combined=self._combined_metric_keys)


# ---------------------------------------------------------------------- helpers
def _build_policy(model, processing_class, model_config, engine, args) -> Policy:
    """One way to a policy: a model id / path / ModelConfig is loaded, a built module is wrapped; both then get
    the same LoRA and training set-up (gradient checkpointing, kernels, activation_memory_gib)."""
    if isinstance(model, ModelConfig):
        if engine is not None:
            raise ValueError("pass engine= only with an already built model")
        return load_policy(model, args)
    if isinstance(model, str):
        config = (model_config or ModelConfig()).replace(model_name_or_path=model)
        return load_policy(config, args)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a model id/path, a ModelConfig or a torch module, got {type(model).__name__}")
    return policy_from_module(model, processing_class, model_config, args, engine)


def _make_optimizer(parameters: list[torch.nn.Parameter], args: GRPOConfig) -> torch.optim.Optimizer:
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optim == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon,
                                            weight_decay=args.weight_decay)
    # on CUDA one fused kernel updates every adapter tensor (hundreds of them) instead of a launch per op
    fused = bool(parameters) and all(p.is_cuda and p.dtype == torch.float32 for p in parameters)
    return torch.optim.AdamW(parameters, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon,
                             weight_decay=args.weight_decay, fused=fused or None)


def _stop_token_ids(tokenizer) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id}
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>") if "<|eot_id|>" in tokenizer.get_vocab() else None
    ids.add(eot)
    return tuple(sorted(i for i in ids if isinstance(i, int)))


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _reward_metrics(scores, rewards: torch.Tensor) -> dict[str, float]:
    return scores.metrics()  # NaN-aware (None rewards), as TRL logs them


def _concatenate_scores(parts: list[Any]) -> Any:
    """One ``RewardScores`` for several scored batches in order (their seconds and failures added up)."""
    if len(parts) == 1:
        return parts[0]
    failures: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for part in parts:
        for name, count in part.failures.items():
            failures[name] = failures.get(name, 0) + count
        for name, value in part.seconds.items():
            seconds[name] = seconds.get(name, 0.0) + value
    return dataclasses.replace(parts[0], values=np.concatenate([part.values for part in parts]), failures=failures,
                               seconds=seconds)


def _metrics_to_host(micro_metrics: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The micro-steps' metrics as floats, with one transfer per device for all their 0-dim tensors."""
    tensors: dict[torch.device, list[tuple[int, str, torch.Tensor]]] = {}
    out = [{} for _ in micro_metrics]
    for i, metrics in enumerate(micro_metrics):
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(value.device, []).append((i, key, value))
            else:
                out[i][key] = float(value)
    for entries in tensors.values():
        values = torch.stack([value.detach().reshape(()).double() for _, _, value in entries]).cpu().tolist()
        for (i, key, _), value in zip(entries, values):
            out[i][key] = value
    return out


def _floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors as floats, read from the device in one transfer."""
    if not values:
        return {}
    numbers = torch.stack([v.detach().reshape(()).double() for v in values.values()]).cpu().tolist()
    return dict(zip(values, numbers))


def _length_metrics(batch: RolloutBatch) -> dict[str, float]:
    lengths = batch.completion_mask.sum(1).float()
    return {"completion_length_mean": float(lengths.mean()), "completion_length_min": float(lengths.min()),
            "completion_length_max": float(lengths.max()), "truncated_fraction": float(batch.truncated.float().mean())}


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    except Exception:
        return float("nan")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
