"""GRPOTrainer: the RL loop. One optimizer step reads generate → score → advantages → loss → update."""

from __future__ import annotations

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
from rlcore.advantages import group_advantages
from rlcore.batching import BatchSchedule, MicroStep, PromptSampler
from rlcore.config import GRPOConfig, ModelConfig
from rlcore.data import is_conversational, load_rows, prompt_token_ids, validate_rows
from rlcore.kernels import offload_activations
from rlcore.logprobs import completion_logprobs
from rlcore.loss import LossSettings, grpo_loss, importance_sampling_correction, sampler_mismatch
from rlcore.model import Policy, add_lora, load_policy
from rlcore.reporting import RunReporter
from rlcore.rewards import RewardFunction, as_reward_function, score_completions
from rlcore.rollout import RolloutEngine, SamplingSettings
from rlcore.rollout_batch import RolloutBatch, pad_rollouts, trimmed_inputs

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
                                     self.args.num_generations, self.args.seed, self.args.shuffle_dataset)
        self.total_steps = self.schedule.total_optimizer_steps(len(self.train_rows), self.args.max_steps,
                                                               self.args.num_train_epochs)
        self.loss_settings = LossSettings.from_config(self.args)
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
        self._nonfinite_in_step = False
        self._consecutive_nonfinite = 0
        self._skipped_steps = 0
        self.step = 0
        self.buffers: dict[int, RolloutBatch] = {}  # generation index → its rollouts

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from_checkpoint: bool | str | None = None) -> dict[str, Any]:
        """Runs to ``total_steps`` optimizer steps; returns a summary (final metrics, output paths)."""
        args = self.args
        _seed_everything(args.seed)
        resume_path = checkpoints.resolve_resume_path(args.output_dir, resume_from_checkpoint)
        if resume_path:
            self._restore(resume_path)
        reporter = RunReporter(args.output_dir, self.total_steps, self.step, args.report_to, args.logging_steps,
                               {"grpo": args.to_dict()}, self.show_progress)
        if resume_path:
            reporter.message(f"resumed from {resume_path} at step {self.step}")
        self.model.train()
        metrics: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            while self.step < self.total_steps:
                metrics = self.training_step(self.step)
                self.step += 1
                if self.eval_rows is not None and args.eval_steps and self.step % args.eval_steps == 0:
                    metrics.update(self.evaluate())
                reporter.log(self.step, metrics)
                if self.step % args.save_steps == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self, self.step, metrics)
        finally:
            plot = reporter.close()
        return {"steps": self.step, "seconds": time.perf_counter() - started, "final_metrics": metrics,
                "output_dir": args.output_dir, "metrics_file": reporter.path, "plot": plot,
                "checkpoint": checkpoints.list_checkpoints(args.output_dir)[-1:] or None,
                "skipped_steps": self._skipped_steps}

    def training_step(self, step: int) -> dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-steps; returns its metrics."""
        micro_steps = self.schedule.micro_steps_for_optimizer_step(step)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # peak_memory_gib is per step
        timings = dict.fromkeys(("generate", "reward", "reference", "standby", "train", "sync"), 0.0)
        for generation in sorted({micro.generation for micro in micro_steps}):
            if generation not in self.buffers:
                self.buffers = {g: b for g, b in self.buffers.items() if g >= micro_steps[0].generation}
                batch = self.make_rollout_batch(generation)  # generate → score → advantages
                self.buffers[generation] = batch
                for key in ("generate", "reward", "reference", "standby"):
                    timings[key] += batch.metrics[f"time_{key}"]
        # "dapo" divides by the active tokens of every micro-batch of this optimizer step
        items = sum(int(self._loss_mask(micro).sum()) for micro in micro_steps)
        start = time.perf_counter()
        micro_metrics, trained_tokens = [], 0
        for micro in micro_steps:
            values, tokens = self.micro_step(micro, items)  # loss → backward
            micro_metrics.append(values)
            trained_tokens += tokens
        update = self.optimizer_step()  # update
        timings["train"] = time.perf_counter() - start
        timings["sync"] = self.engine.sync_weights().get("seconds", 0.0) if update["applied"] else 0.0
        return self._step_metrics(micro_metrics, update, timings, trained_tokens,
                                  self.buffers[micro_steps[-1].generation])

    # ------------------------------------------------------------------ generate → score → advantages
    def make_rollout_batch(self, generation: int) -> RolloutBatch:
        args = self.args
        row_ids = self.sampler.completion_rows(generation)
        rows = [self.train_rows[i] for i in row_ids]
        encoded = [self._encode_prompt("train", i, row["prompt"]) for i, row in zip(row_ids, rows)]
        prompt_ids = [ids for ids, _ in encoded]
        prompts_truncated = sum(t for _, t in encoded) // args.num_generations

        start = time.perf_counter()
        wake = self.engine.wake()
        generate_start = time.perf_counter()
        rollouts = self.engine.generate(prompt_ids, self.sampling_settings(seed=args.seed * 100_003 + generation))
        generate_seconds = time.perf_counter() - generate_start
        sleep = self.engine.sleep()
        standby_seconds = (time.perf_counter() - start) - generate_seconds

        start = time.perf_counter()
        scores, completions = self._score(rows, rollouts)
        reward_seconds = time.perf_counter() - start

        rewards = torch.as_tensor(scores.weighted_sum(), dtype=torch.float32)
        advantages, advantage_stats = group_advantages(rewards, args.num_generations, args.scale_rewards)
        tensors = pad_rollouts(rollouts, self.tokenizer.pad_token_id, self.device)
        batch = RolloutBatch(generation, *tensors, advantages=advantages.to(self.device))

        start = time.perf_counter()
        self._add_reference_logps(batch)
        reference_seconds = time.perf_counter() - start
        batch.metrics = {
            **_reward_metrics(scores, rewards),
            **{f"advantage_{k}": float(v) for k, v in advantage_stats.items()},
            **_length_metrics(batch),
            "prompts_truncated": prompts_truncated,
            "completion_tokens": int(batch.completion_mask.sum()),
            "generation_tokens_per_second": int(batch.completion_mask.sum()) / max(generate_seconds, 1e-9),
            "time_generate": generate_seconds, "time_reward": reward_seconds, "time_standby": standby_seconds,
            "time_reference": reference_seconds,
            **{f"standby_{k}": v for k, v in {**wake, **sleep}.items() if isinstance(v, (int, float))},
            **batch.metrics,
        }
        if args.log_completions:
            batch.metrics["sample_completion"] = str(completions[0])[:500]
        return batch

    def _add_reference_logps(self, batch: RolloutBatch) -> None:
        """Old-policy, reference and sampling-correction terms, all computed once per generation, no grad."""
        args = self.args
        # Off-policy unless every micro-step reading this generation falls before the same optimizer update.
        uses_per_generation = args.steps_per_generation * args.num_iterations
        needs_old = (args.gradient_accumulation_steps % uses_per_generation != 0
                     or args.vllm_importance_sampling_correction)
        if needs_old:
            batch.old_logps = self._logps_no_grad(batch)
            mask = batch.completion_mask
            if args.mask_truncated_completions:
                mask = mask * (~batch.truncated).unsqueeze(1)
            # the train/inference mismatch, logged every step: the engine's logprobs vs the trainer's
            mismatch = sampler_mismatch(batch.old_logps, batch.sampling_logps, mask)
            batch.metrics.update({f"mismatch_{k}": float(v) for k, v in mismatch.items()})
            if args.vllm_importance_sampling_correction:
                batch.is_weights, weight_metrics = importance_sampling_correction(
                    batch.old_logps, batch.sampling_logps, mask,
                    mode=args.vllm_importance_sampling_mode, clip_min=args.vllm_importance_sampling_clip_min,
                    clip_max=args.vllm_importance_sampling_clip_max)
                batch.metrics.update({f"sampling_is_{k}": float(v) for k, v in weight_metrics.items()
                                      if k in ("min", "mean", "max", "fraction_corrected")})
        if args.beta > 0.0:
            with self.model.disable_adapter():  # the reference is the base model: no second copy of the weights
                batch.ref_logps = self._logps_no_grad(batch)

    @torch.no_grad()
    def _logps_no_grad(self, batch: RolloutBatch) -> torch.Tensor:
        out = torch.zeros_like(batch.sampling_logps)
        size = self.args.per_device_train_batch_size
        for start in range(0, batch.completion_ids.shape[0], size):
            rows = list(range(start, min(start + size, batch.completion_ids.shape[0])))
            input_ids, attention_mask, width = trimmed_inputs(batch, rows)
            logps = completion_logprobs(self.model, input_ids, attention_mask, width, self.args.temperature,
                                        self.args.logprob_chunk_size, packed=self.args.padding_free)
            out[rows, :width] = logps.float()
        return out

    # ------------------------------------------------------------------ loss
    def micro_step(self, micro: MicroStep, items_in_step: int) -> tuple[dict[str, float], int]:
        """Forward, loss and backward on one slice of a generation; returns its metrics and token count."""
        batch, rows = self.buffers[micro.generation], list(micro.sample_indices)
        input_ids, attention_mask, width = trimmed_inputs(batch, rows)
        want_entropy = self.args.top_entropy_quantile < 1.0
        # tensors saved for backward go to host memory as the forward makes them; backward brings them back
        offload = offload_activations() if self.args.activation_offloading else nullcontext()
        with offload:
            out = completion_logprobs(self.model, input_ids, attention_mask, width, self.args.temperature,
                                      self.args.logprob_chunk_size, return_entropy=want_entropy,
                                      packed=self.args.padding_free)
            logps, entropies = out if want_entropy else (out, None)

        def take(tensor):
            return None if tensor is None else tensor[rows][:, :width]

        is_weights = batch.is_weights
        if is_weights is not None and is_weights.shape[1] != 1:  # token-level weights are [N, C]
            is_weights = take(is_weights)
        elif is_weights is not None:
            is_weights = is_weights[rows]
        loss, metrics = grpo_loss(
            logps.float(), take(batch.old_logps), take(batch.ref_logps), batch.advantages[rows],
            take(batch.completion_mask), settings=self.loss_settings, importance_weights=is_weights,
            sampling_per_token_logps=take(batch.sampling_logps), entropies=entropies,
            truncated=batch.truncated[rows], num_items_in_batch=items_in_step,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps)
        if torch.isfinite(loss):
            loss.backward()
        else:
            self._nonfinite_in_step = True
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["loss"] = float(loss.detach())
        if self.args.activation_offloading:
            metrics["activation_offload_gib"] = offload.offloaded_bytes / 2**30
        return metrics, int(attention_mask.sum())

    def _loss_mask(self, micro: MicroStep) -> torch.Tensor:
        batch, rows = self.buffers[micro.generation], list(micro.sample_indices)
        mask = batch.completion_mask[rows]
        if self.args.mask_truncated_completions:
            mask = mask * (~batch.truncated[rows]).unsqueeze(1)
        return mask

    # ------------------------------------------------------------------ update
    def optimizer_step(self) -> dict[str, Any]:
        """Clips and applies the accumulated gradient unless it is NaN/inf; then advances the LR schedule."""
        nonfinite, self._nonfinite_in_step = self._nonfinite_in_step, False
        if self.args.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.args.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])
        grad_norm = float(grad_norm)
        applied = not nonfinite and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
            self._consecutive_nonfinite = 0
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
        return {"applied": applied, "grad_norm": grad_norm, "learning_rate": lr}

    # ------------------------------------------------------------------ evaluation, sampling, checkpoints
    def sampling_settings(self, seed: int | None = None, greedy: bool = False) -> SamplingSettings:
        args = self.args
        return SamplingSettings(max_tokens=args.max_completion_length, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, min_p=args.min_p or 0.0,
                                repetition_penalty=args.repetition_penalty, stop_token_ids=self.stop_tokens,
                                seed=seed, greedy=greedy)

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
        out = {"eval_reward_mean": float(scores.weighted_sum().mean())}
        for j, name in enumerate(scores.names):
            out[f"eval_rewards/{name}"] = float(scores.values[:, j].mean())
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
        }
        configs = {"grpo": self.args.to_dict(), "model_path": self.policy.model_path}
        return checkpoints.save_checkpoint(self.args.output_dir, self.step, self.model, self.tokenizer, state,
                                           configs, self.args.save_total_limit)

    def _restore(self, path: str) -> None:
        state = checkpoints.load_trainer_state(path)
        checkpoints.load_adapter_weights(self.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        checkpoints.restore_rng_state(state["rng"])
        self.buffers = {g: RolloutBatch.from_state(b, self.device) for g, b in state["buffers"].items()}
        self.step = state["step"]
        self._consecutive_nonfinite = state["consecutive_nonfinite"]
        self._skipped_steps = state["skipped_steps"]
        self.engine.sync_weights()

    def _encode_prompt(self, split: str, row: int, prompt: Any) -> tuple[list[int], bool]:
        """Token ids of a dataset row's prompt, tokenised once per run."""
        key = (split, row)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = prompt_token_ids(self.tokenizer, prompt, self.args.max_prompt_length)
        return self._prompt_cache[key]

    def _step_metrics(self, micro_metrics: list[dict[str, float]], update: dict[str, Any],
                      timings: dict[str, float], trained_tokens: int, batch: RolloutBatch) -> dict[str, Any]:
        keys = {k for m in micro_metrics for k in m}
        metrics: dict[str, Any] = {}
        for key in sorted(keys):
            values = [m[key] for m in micro_metrics if key in m]
            metrics[key] = float(np.max(values)) if key.endswith("_max") else float(np.mean(values))
        metrics["loss"] = float(np.sum([m["loss"] for m in micro_metrics]))
        metrics.update({k: v for k, v in batch.metrics.items() if not k.startswith("time_")})
        metrics["grad_norm"] = update["grad_norm"]
        metrics["learning_rate"] = update["learning_rate"]
        metrics["update_skipped"] = not update["applied"]
        metrics["skipped_steps_total"] = self._skipped_steps
        for key, seconds in timings.items():
            metrics[f"time_{key}"] = seconds
        total = sum(timings.values())
        metrics["time_step"] = total
        metrics["train_tokens_per_second"] = trained_tokens / max(timings["train"], 1e-9)
        generated = batch.metrics["completion_tokens"] if timings["generate"] else 0
        metrics["tokens_per_second"] = (trained_tokens + generated) / max(total, 1e-9)
        metrics["peak_memory_gib"] = _peak_memory_gib()
        if torch.cuda.is_available():
            # what the device really holds after training: with vLLM, the allocator peak above also counts
            # vLLM's memory pools, released or not
            free, total = torch.cuda.mem_get_info()
            metrics["device_memory_used_gib"] = (total - free) / 2**30
        return metrics


# ---------------------------------------------------------------------- helpers
def _build_policy(model, processing_class, model_config, engine, args) -> Policy:
    if isinstance(model, ModelConfig):
        if engine is not None:
            raise ValueError("pass engine= only with an already built model")
        return load_policy(model, args)
    if isinstance(model, str):
        config = (model_config or ModelConfig()).replace(model_name_or_path=model)
        return load_policy(config, args)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a model id/path, a ModelConfig or a torch module, got {type(model).__name__}")
    if processing_class is None:
        raise ValueError("processing_class (the tokenizer) is required when model is an already built module")
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model = add_lora(model, model_config or ModelConfig())
    if processing_class.pad_token_id is None:
        processing_class.pad_token = processing_class.eos_token
    if engine is None:
        from rlcore.hf_engine import HFEngine

        engine = HFEngine(model, processing_class)
    return Policy(model=model, tokenizer=processing_class, engine=engine,
                  model_path=getattr(model.config, "_name_or_path", ""))


def _make_optimizer(parameters: list[torch.nn.Parameter], args: GRPOConfig) -> torch.optim.Optimizer:
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optim == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon,
                                            weight_decay=args.weight_decay)
    return torch.optim.AdamW(parameters, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon,
                             weight_decay=args.weight_decay)


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
    out = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0}
    for j, name in enumerate(scores.names):
        column = scores.values[:, j]
        out[f"rewards/{name}/mean"] = float(column.mean())
        out[f"rewards/{name}/std"] = float(column.std(ddof=1)) if len(column) > 1 else 0.0
        out[f"time_reward/{name}"] = scores.seconds.get(name, 0.0)
    for name, count in scores.failures.items():
        out[f"rewards/{name}/failures"] = count
    return out


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
