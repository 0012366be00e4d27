"""The arithmetic GRPO run of ``benchmarks/learning_gpu.py`` through TRL 1.16's GRPOTrainer, for side-by-side curves.

TRL gets the settings of ``examples/arithmetic_grpo.py`` (:func:`trl_arithmetic_config` maps them name by name;
``tests/test_learning_benchmarks.py`` checks the mapping field by field with :func:`setting_mismatches`), the same
prompts in the same order: step k of either run generates for the same prompts. rlcore's own sampler
(:class:`rlcore.batching.PromptSampler`, a seeded permutation per epoch) picks them (:func:`rlcore_prompt_order`);
TRL gets the rows already in that order, one row per prompt generated, and ``shuffle_dataset=False``, so its
RepeatSampler takes them as they come (the one setting set differently on purpose). The sampling streams still
differ: one run per framework is one trajectory each. The same two rewards with the same weights (rlcore's reward
classes are TRL-style callables), the same LoRA and the same seed. On the GPU it runs as users run it:
``use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True``, bf16, gradient checkpointing.

What is measured, the same way as for rlcore's runs (:func:`make_budget_callback`):

* each optimizer step's wall time, ``on_step_begin`` → ``on_step_end`` with the device synchronized at both ends;
  the run stops after the step at which the sum of step times would overrun ``--seconds`` with one more step;
* held-out accuracy every ``eval_steps`` steps, before the first step and at the last: greedy decoding of the same
  256 held-out problems, scored by :class:`~rlcore.rewards.CorrectAnswer`. TRL has no greedy evaluation of its
  own, so the callback decodes with the live PEFT model through transformers (rlcore's HF engine loop); its time
  is left out of the step times on both sides;
* TRL's own per-step logs (reward, per-reward means, vLLM/trainer log-prob gap, IS ratios), kept verbatim beside
  rlcore-named copies (``reward_mean``, ``rewards/<name>/mean``, ``time_step``) in ``metrics.jsonl``.

``--smoke`` (CPU): transformers generation instead of vLLM, a few steps, the tiny arithmetic model.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(1, path)

ACCURACY = "eval_rewards/correct_answer"
# GRPOConfig fields whose meaning is the same in rlcore and TRL and which the arithmetic example sets or defaults
SAME_NAMED = ("learning_rate", "lr_scheduler_type", "weight_decay", "max_grad_norm", "adam_beta1",
              "adam_beta2", "adam_epsilon", "optim", "num_generations", "per_device_train_batch_size",
              "gradient_accumulation_steps", "steps_per_generation", "max_completion_length", "temperature",
              "top_p", "top_k", "repetition_penalty", "beta", "epsilon", "num_iterations", "loss_type",
              "scale_rewards", "importance_sampling_level", "mask_truncated_completions", "top_entropy_quantile",
              "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
              "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max", "delta",
              "sapo_temperature_neg", "sapo_temperature_pos", "off_policy_mask_threshold", "use_bias_correction_kl",
              "gradient_checkpointing", "seed", "max_steps")

# rlcore's metric names for the same quantities in TRL's logs (TRL's own keys are kept too)
RLCORE_NAMES = {"reward_mean": "reward", "mismatch_logp_diff_mean": "sampling/sampling_logp_difference/mean",
                "sampling_is_min": "sampling/importance_sampling_ratio/min",
                "sampling_is_mean": "sampling/importance_sampling_ratio/mean",
                "sampling_is_max": "sampling/importance_sampling_ratio/max",
                "completion_length_mean": "completions/mean_length"}


def trl_arithmetic_config(model_config, grpo_config, rewards, output_dir: str, *, smoke: bool = False,
                          **extra: Any):
    """TRL's GRPOConfig carrying rlcore's ``(model_config, grpo_config)`` settings for the arithmetic run.

    On a GPU: colocated vLLM with sleep mode (rlcore's ``standby``), vLLM's share of the GPU
    ``model_config.gpu_memory_utilization``, bf16. ``smoke``: no vLLM and on the CPU in float32.
    """
    from trl import GRPOConfig

    fields: dict[str, Any] = {name: getattr(grpo_config, name) for name in SAME_NAMED}
    fields.update(
        output_dir=output_dir, epsilon_high=grpo_config.epsilon_high, min_p=grpo_config.min_p,
        # transformers 5 has no warmup_ratio: a warmup_steps below 1 is read as the ratio
        warmup_steps=grpo_config.warmup_ratio,
        reward_weights=[reward.weight for reward in rewards],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        log_completions=False,
        # the rows come in rlcore's order (trl_train_rows): TRL's sampler must not shuffle them again
        shuffle_dataset=False,
    )
    if smoke:
        fields.update(use_vllm=False, use_cpu=True, bf16=False,
                      model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"})
    else:
        fields.update(
            bf16=model_config.dtype == "bfloat16",
            model_init_kwargs={"dtype": model_config.dtype, "attn_implementation": "sdpa"},
            use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=model_config.standby,
            vllm_gpu_memory_utilization=model_config.gpu_memory_utilization,
            vllm_max_model_length=model_config.max_seq_length)
    fields.update(extra)
    return GRPOConfig(**fields)


def setting_mismatches(model_config, grpo_config, rewards, trl_args, lora) -> list[tuple[str, Any, Any]]:
    """Every (setting, rlcore value, TRL value) the two arithmetic runs could differ in; empty when identical.

    ``shuffle_dataset`` differs on purpose: TRL's rows come already in rlcore's order (:func:`trl_train_rows`,
    shuffled or not as rlcore's ``shuffle_dataset`` says), so TRL must keep them as they are: any TRL value but
    False is reported, whatever rlcore's.
    """
    pairs = [(name, getattr(grpo_config, name), getattr(trl_args, name)) for name in SAME_NAMED]
    pairs += [
        ("shuffle_dataset (TRL: off, its rows come in rlcore's order)", False, trl_args.shuffle_dataset),
        ("epsilon_high", grpo_config.epsilon_high,
         trl_args.epsilon if trl_args.epsilon_high is None else trl_args.epsilon_high),
        ("min_p", grpo_config.min_p or 0.0, trl_args.min_p or 0.0),
        ("warmup (ratio of the steps)", grpo_config.warmup_ratio, trl_args.warmup_steps),
        ("reward weights", [float(r.weight) for r in rewards], [float(w) for w in trl_args.reward_weights]),
        ("lora r", model_config.lora_r, lora.r), ("lora alpha", model_config.lora_alpha, lora.lora_alpha),
        ("lora dropout", model_config.lora_dropout, lora.lora_dropout),
        ("lora targets", sorted(model_config.target_modules), sorted(lora.target_modules)),
    ]
    if trl_args.use_vllm:
        pairs += [("bf16", model_config.dtype == "bfloat16", bool(trl_args.bf16)),
                  ("engine releases memory between phases", model_config.standby, trl_args.vllm_enable_sleep_mode),
                  ("max_model_len", model_config.max_seq_length, trl_args.vllm_max_model_length)]
    plain = [(name, getattr(a, "value", a), getattr(b, "value", b)) for name, a, b in pairs]
    return [(name, a, b) for name, a, b in plain if a != b]


def rlcore_prompt_order(grpo_config, dataset_size: int) -> list[int]:
    """The dataset row of every prompt rlcore's trainer generates for, generation after generation, over a whole
    run of ``grpo_config`` on ``dataset_size`` rows: generation g's prompts are entries [g·P, (g+1)·P) with
    P = ``prompts_per_generation`` = generation_batch_size / num_generations.

    Read from rlcore's own :class:`~rlcore.batching.PromptSampler` (each epoch a fresh permutation seeded by
    (seed, epoch), whole generations only) and :class:`~rlcore.batching.BatchSchedule` (the generations the last
    optimizer step reads), built as :class:`rlcore.trainer.GRPOTrainer` builds them for one process.
    """
    from rlcore.batching import BatchSchedule, PromptSampler

    schedule = BatchSchedule(grpo_config)
    sampler = PromptSampler(dataset_size, grpo_config.prompts_per_generation, grpo_config.num_generations,
                            grpo_config.seed, grpo_config.shuffle_dataset)
    steps = schedule.total_optimizer_steps(dataset_size, grpo_config.max_steps, grpo_config.num_train_epochs)
    generations = schedule.micro_steps_for_optimizer_step(steps - 1)[-1].generation + 1
    return [row for generation in range(generations) for row in sampler.prompt_indices(generation)]


def trl_train_rows(rows: list[dict[str, Any]], grpo_config) -> list[dict[str, Any]]:
    """TRL's training rows for the run: ``rows`` in rlcore's order (:func:`rlcore_prompt_order`, epochs included).

    With ``shuffle_dataset=False`` TRL 1.16's RepeatSampler cuts its dataset into consecutive chunks of
    generation_batch_size / num_generations rows and generation g takes chunk g (each row num_generations times),
    the chunk replayed for steps_per_generation × num_iterations micro-steps; so TRL's generation g, and with it
    its optimizer step k, gets the prompts of rlcore's generation g. The list is a whole number of chunks and lasts
    the run.
    """
    return [rows[index] for index in rlcore_prompt_order(grpo_config, len(rows))]


def trl_lora_config(model_config):
    """PEFT's LoraConfig with rlcore's LoRA settings."""
    from peft import LoraConfig

    return LoraConfig(r=model_config.lora_r, lora_alpha=model_config.lora_alpha,
                      lora_dropout=model_config.lora_dropout, target_modules=list(model_config.target_modules),
                      bias="none", task_type="CAUSAL_LM")


def as_trl_reward(reward):
    """An rlcore reward as a TRL reward function: the same call, with the ``__name__`` TRL logs it under."""

    def score(prompts, completions, **columns):
        return reward(prompts, completions, **columns)

    score.__name__ = reward.name
    return score


def heldout_accuracy(model, tokenizer, count: int, max_tokens: int) -> float:
    """Greedy accuracy of ``model`` on the first ``count`` held-out arithmetic problems (seed 0: the example's)."""
    import torch

    from rlcore.arithmetic import greedy_accuracy, heldout_problems

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return greedy_accuracy(model, tokenizer, heldout_problems(count, seed=0), max_tokens=max_tokens)
    finally:
        if was_training:
            model.train()


def make_budget_callback(seconds: float, eval_steps: int, evaluate, metrics_path: str):
    """A ``transformers.TrainerCallback``: step wall times, the wall-clock budget, greedy held-out evaluation
    (``evaluate(model) -> accuracy``, its time left out of the step times) and one metrics.jsonl line per step."""
    import torch
    from transformers import TrainerCallback

    def synchronize() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class Budget(TrainerCallback):
        def __init__(self) -> None:
            self.step_started = 0.0
            self.train_seconds = 0.0
            self.eval_seconds = 0.0
            self.wall: list[tuple[int, float]] = []
            self.records: dict[int, dict[str, Any]] = {}
            self.stopped_by_budget = False
            self.flushed: set[int] = set()
            self.handle = open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in on_train_end

        def _evaluate(self, step: int, model) -> None:
            started = time.perf_counter()
            accuracy = evaluate(model)
            self.eval_seconds += time.perf_counter() - started
            self.records.setdefault(step, {"step": step})[ACCURACY] = accuracy
            print(f"  step {step:4d}  held-out accuracy {accuracy:.3f}", flush=True)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._evaluate(0, model)
            self._flush(0)

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self.step_started = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            synchronize()
            step_seconds = time.perf_counter() - self.step_started
            self.train_seconds += step_seconds
            step = state.global_step
            self.wall.append((step, self.train_seconds))
            self.records.setdefault(step, {"step": step})["time_step"] = step_seconds
            per_step = self.train_seconds / max(step, 1)
            if self.train_seconds + per_step > seconds:
                self.stopped_by_budget = True
                control.should_training_stop = True
            if step % eval_steps == 0 or control.should_training_stop or step >= state.max_steps:
                self._evaluate(step, model)
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            step = state.global_step
            record = self.records.setdefault(step, {"step": step})
            record.update({key: value for key, value in (logs or {}).items() if isinstance(value, (int, float))})
            if "reward" not in record or "time_step" not in record:
                return  # the end-of-training summary, not a step
            if step in self.flushed:
                return  # the end-of-training summary is logged at the last step again
            for ours, theirs in RLCORE_NAMES.items():
                if theirs in record:
                    record[ours] = record[theirs]
            print(f"  step {step:4d}  {self.train_seconds:7.1f} s  reward {record['reward_mean']:.3f}  "
                  f"step time {record['time_step']:.2f} s  mismatch |dlogp| "
                  f"{record.get('mismatch_logp_diff_mean', float('nan')):.4f}", flush=True)
            self._flush(step)

        def _flush(self, step: int) -> None:
            self.flushed.add(step)
            self.handle.write(json.dumps(self.records[step]) + "\n")
            self.handle.flush()

        def on_train_end(self, args, state, control, **kwargs):
            self.handle.close()

    return Budget()


def prepare_colocated_vllm_environment() -> None:
    """What TRL's colocate mode needs in this process before TRL is imported: vLLM in-process
    (``external_launcher``) reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; LOCAL_RANK must stay unset, or
    accelerate would take the run for a distributed one and wrap the model in DistributedDataParallel."""
    import socket

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)
    os.environ.pop("LOCAL_RANK", None)


def phase_trl(options) -> int:
    """One TRL run (a child process of ``learning_gpu.py``): writes ``<run_dir>/metrics.jsonl`` and the result."""
    started = time.perf_counter()
    if not options.smoke:
        prepare_colocated_vllm_environment()
    import torch
    import trl
    from datasets import Dataset
    from learning_gpu import EXAMPLE, device_name, versions
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from rlcore.run import load_example

    example = load_example(EXAMPLE)
    eval_steps = 2 if options.smoke else example.config.eval_steps
    steps = -(-options.max_steps // eval_steps) * eval_steps
    model_config = example.model.replace(model_name_or_path=options.model_dir, engine="vllm")
    grpo_config = example.config.replace(output_dir=options.run_dir, max_steps=steps, seed=options.seed)
    if options.smoke:
        grpo_config = grpo_config.replace(learning_rate=3e-3, per_device_train_batch_size=16,
                                          max_completion_length=48, gradient_checkpointing=False)
    rows = example.dataset()
    heldout = 32 if options.smoke else len(example.eval_dataset())
    os.makedirs(options.run_dir, exist_ok=True)
    args = trl_arithmetic_config(model_config, grpo_config, example.rewards, options.run_dir, smoke=options.smoke)
    lora = trl_lora_config(model_config)
    mismatches = setting_mismatches(model_config, grpo_config, example.rewards, args, lora)
    if mismatches:
        raise SystemExit(f"TRL's settings differ from rlcore's: {mismatches}")
    tokenizer = AutoTokenizer.from_pretrained(options.model_dir, padding_side="left")
    metrics_path = os.path.join(options.run_dir, "metrics.jsonl")
    max_tokens = grpo_config.max_completion_length
    budget = make_budget_callback(options.seconds, eval_steps,
                                  lambda m: heldout_accuracy(m, tokenizer, heldout, max_tokens), metrics_path)
    # as users call it: the model's path, TRL loads it (model_init_kwargs) and wraps it with PEFT
    trainer = GRPOTrainer(model=options.model_dir, reward_funcs=[as_trl_reward(r) for r in example.rewards],
                          args=args, train_dataset=Dataset.from_list(trl_train_rows(rows, grpo_config)),
                          processing_class=tokenizer, peft_config=lora, callbacks=[budget])
    setup_seconds = time.perf_counter() - started
    print(f"TRL {trl.__version__} GRPO: set up in {setup_seconds:.1f} s; up to {steps} steps or "
          f"{options.seconds:.0f} s of steps", flush=True)
    grpo_started = time.perf_counter()
    trainer.train()
    result = {
        "engine": "trl", "framework": "trl", "dtype": "float32" if options.smoke else model_config.dtype,
        "steps": budget.wall[-1][0] if budget.wall else 0,
        "grpo_seconds": time.perf_counter() - grpo_started, "setup_seconds": setup_seconds,
        "train_seconds": budget.train_seconds, "eval_seconds": budget.eval_seconds, "wall": budget.wall,
        "stopped_by_budget": budget.stopped_by_budget, "budget_seconds": options.seconds,
        "settings": {name: str(getattr(args, name)) for name in (*SAME_NAMED, "shuffle_dataset")},
        "config": {"trl": {k: str(v) for k, v in args.to_dict().items()}},
        "versions": {**versions(), "trl": trl.__version__}, "device": device_name(torch),
    }
    with open(options.result, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, default=str)
    sys.stdout.flush()
    os._exit(0)  # as for rlcore's runs: vLLM's threads can hang interpreter teardown
