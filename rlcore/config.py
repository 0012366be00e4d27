"""Configuration: :class:`GRPOConfig` (the algorithm, TRL's names and defaults) and :class:`ModelConfig`.

Both are dataclasses validated once, at construction. An impossible setting raises ``ValueError`` naming the
field and what is allowed, so a typo fails before any model is loaded. The allowed names of the loss, the
importance-sampling modes and the reward scaling live here only; :mod:`rlcore.loss` and
:mod:`rlcore.advantages` import them, and :class:`rlcore.loss.LossSettings` is checked by the same
:func:`validate_loss_fields`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw_torch", "adamw_8bit")
REPORT_TO = ("none", "tensorboard", "wandb")
DTYPES = ("bfloat16", "float16", "float32", "float8")
ENGINES = ("auto", "vllm", "hf")
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Largest accepted ratio bound / temperature: a bound that large never binds, and beyond ~3.4e38 the value does
# not even fit the float32 the loss computes in.
MAX_RATIO_BOUND = 1e4
MAX_LEARNING_RATE = 1.0  # an Adam step moves each weight by about the learning rate
SEED_RANGE = (0, 2**32 - 1)  # what numpy accepts (torch and vLLM take it too)


def launched_processes(environ: Any = None) -> tuple[int, str]:
    """(processes in the job, where that number comes from): torchrun's ``WORLD_SIZE``, or 1 when unset."""
    text = (os.environ if environ is None else environ).get("WORLD_SIZE")
    if text is None:
        return 1, "started without torchrun: WORLD_SIZE is unset"
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"WORLD_SIZE={text!r} is not allowed: the launcher must set an integer >= 1")
    return size, f"the launcher's WORLD_SIZE={size}"


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field_name}={value!r} is not allowed: {allowed}")


def _choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field_name, value, "expected one of " + ", ".join(repr(c) for c in choices))


def _positive_int(field_name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field_name, value, f"expected an integer >= {minimum}")


def _number(field_name: str, value: Any, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field_name, value, "expected a finite number")
    reason = f" ({why})" if why else ""
    if low is not None and (value < low or (low_open and value == low)):
        _fail(field_name, value, f"expected a number {'>' if low_open else '>='} {low:g}{reason}")
    if high is not None and (value > high or (high_open and value == high)):
        _fail(field_name, value, f"expected a number {'<' if high_open else '<='} {high:g}{reason}")


def _boolean(field_name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(field_name, value, "expected True or False")


def validate_loss_fields(settings: Any) -> None:
    """Checks the loss fields of a :class:`GRPOConfig` or :class:`rlcore.loss.LossSettings` (same names).

    ``epsilon`` < 1 because 1 − epsilon is the lowest ratio the clip keeps; ratio bounds and temperatures are at
    most :data:`MAX_RATIO_BOUND`. Raises ``ValueError`` naming the field.
    """
    _choice("loss_type", settings.loss_type, LOSS_TYPES)
    _choice("importance_sampling_level", settings.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    if settings.loss_type == "luspo" and settings.importance_sampling_level != "sequence":
        _fail("importance_sampling_level", settings.importance_sampling_level,
              "loss_type='luspo' requires importance_sampling_level='sequence' (LUSPO scales the sequence-level "
              "GSPO objective by the completion length)")
    _number("beta", settings.beta, 0.0, MAX_RATIO_BOUND)
    _number("epsilon", settings.epsilon, 0.0, 1.0, low_open=True, high_open=True,
            why="1 - epsilon is the lowest importance ratio the clip keeps")
    bound = f"a ratio bound above {MAX_RATIO_BOUND:g} never binds"
    if settings.epsilon_high is not None:
        _number("epsilon_high", settings.epsilon_high, 0.0, MAX_RATIO_BOUND, low_open=True, why=bound)
    if settings.delta is not None:
        _number("delta", settings.delta, 1.0, MAX_RATIO_BOUND, low_open=True, why=bound)
    for name in ("sapo_temperature_neg", "sapo_temperature_pos"):
        _number(name, getattr(settings, name), 0.0, MAX_RATIO_BOUND, low_open=True)
    _positive_int("max_completion_length", settings.max_completion_length)
    _number("top_entropy_quantile", settings.top_entropy_quantile, 0.0, 1.0)
    if settings.off_policy_mask_threshold is not None:
        _number("off_policy_mask_threshold", settings.off_policy_mask_threshold, 0.0, MAX_RATIO_BOUND,
                low_open=True)
    _boolean("use_bias_correction_kl", settings.use_bias_correction_kl)
    _boolean("mask_truncated_completions", settings.mask_truncated_completions)


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied and validated (derived fields are recomputed)."""
        values = self.to_dict()
        for name in getattr(self, "_derived_fields", ()):
            if name not in changes:
                values[name] = getattr(self, "_given_" + name)
        values.update(changes)
        return type(self).from_dict(values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


@dataclass
class GRPOConfig(_Serializable):
    """GRPO / GSPO training settings. Names and defaults follow TRL's ``GRPOConfig`` (1.16) where it has them.

    Batch semantics: a *generation* samples ``generation_batch_size`` completions, i.e.
    ``generation_batch_size / num_generations`` unique prompts; it is consumed in ``steps_per_generation``
    micro-steps of ``per_device_train_batch_size`` completions per process; the optimizer steps every
    ``gradient_accumulation_steps`` micro-steps; ``num_iterations`` replays each generation. ``max_steps`` counts
    optimizer steps. With ``num_processes`` = W > 1 (torchrun) every count above except
    ``per_device_train_batch_size`` is global: each process generates and trains on 1/W of every generation, in
    whole groups. See :mod:`rlcore.batching` and :mod:`rlcore.distributed`.
    """

    # optimisation
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "adamw_torch"
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int = -1
    num_train_epochs: float = 1.0
    # batches
    num_generations: int = 8
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    steps_per_generation: int | None = None
    generation_batch_size: int | None = None
    num_iterations: int = 1
    num_processes: int | None = None  # processes of the job (one per GPU): torchrun's WORLD_SIZE; None follows it
    shuffle_dataset: bool = True
    # lengths
    max_prompt_length: int | None = 512
    max_completion_length: int = 512
    # sampling
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    # loss
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    loss_type: str = "dapo"
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    mask_truncated_completions: bool = False
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    use_bias_correction_kl: bool = True
    # rewards
    reward_weights: list[float] | None = None
    scale_rewards: str | bool = "group"
    # dynamic sampling (DAPO): a group whose rewards all tie has zero advantage and teaches nothing; it is
    # dropped and completions of further prompts are generated until the generation batch is full, at most
    # dynamic_sampling_max_retries extra rounds (see rlcore.dynamic_sampling)
    dynamic_sampling: bool = False
    dynamic_sampling_max_retries: int = 3
    # train/inference mismatch correction (truncated importance sampling against the engine's logprobs)
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_cap: float | None = None  # deprecated alias of _clip_max, as in TRL
    # robustness
    max_consecutive_nonfinite: int = 3
    overwrite_output_dir: bool = False  # start over in an output_dir that holds another run (its files are removed)
    # memory
    logprob_chunk_size: int | None = None  # tokens per lm_head chunk; None: from free GPU memory (1024 on CPU)
    gradient_checkpointing: bool = True
    # GiB that the saved activations of layers left out of gradient checkpointing may take at the largest
    # micro-batch; those layers are not recomputed in backward (faster). None: every layer is recomputed.
    activation_memory_gib: float | None = None
    activation_offloading: bool = False  # checkpointed activations go to pinned CPU memory (long completions)
    padding_free: bool = False  # micro-batches packed into one row without pad tokens
    # evaluation
    eval_steps: int | None = None
    per_device_eval_batch_size: int = 8
    # logging and checkpoints
    logging_steps: int = 1
    save_steps: int = 500
    save_total_limit: int | None = None
    output_dir: str = "outputs"
    report_to: str | list[str] = "none"
    seed: int = 42
    log_completions: bool = False
    ddp_timeout: int = 1800  # torchrun: seconds a process waits for the others in one exchange before stopping

    _derived_fields = ("steps_per_generation", "generation_batch_size", "epsilon_high", "num_processes")

    def __post_init__(self) -> None:
        self._given_num_processes = self.num_processes
        self._given_steps_per_generation = self.steps_per_generation
        self._given_generation_batch_size = self.generation_batch_size
        self._given_epsilon_high = self.epsilon_high
        if self.scale_rewards is True:
            self.scale_rewards = "group"
        elif self.scale_rewards is False:
            self.scale_rewards = "none"
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        self.report_to = list(self.report_to)
        if self.vllm_importance_sampling_cap is not None:
            warnings.warn("vllm_importance_sampling_cap is deprecated: use vllm_importance_sampling_clip_max",
                          FutureWarning, stacklevel=3)
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        self._validate()
        self._derive_batches()

    def _validate(self) -> None:
        _number("learning_rate", self.learning_rate, 0.0, MAX_LEARNING_RATE, low_open=True,
                why="an Adam step moves each weight by about the learning rate; LoRA RL uses 1e-6 to 1e-4")
        _number("weight_decay", self.weight_decay, 0.0)
        _number("adam_beta1", self.adam_beta1, 0.0, 1.0, high_open=True)
        _number("adam_beta2", self.adam_beta2, 0.0, 1.0, high_open=True)
        _number("adam_epsilon", self.adam_epsilon, 0.0, low_open=True)
        _choice("optim", self.optim, OPTIMIZERS)
        if self.optim == "adamw_8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                _fail("optim", self.optim, "'adamw_8bit' needs bitsandbytes installed (pip install bitsandbytes); "
                      "use 'adamw_torch'")
        _choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        _number("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _number("max_grad_norm", self.max_grad_norm, 0.0)
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or (
                self.max_steps < 1 and self.max_steps != -1):
            _fail("max_steps", self.max_steps, "expected a positive integer, or -1 to use num_train_epochs")
        _number("num_train_epochs", self.num_train_epochs, 0.0, low_open=True)
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) \
                or self.num_generations < 2:
            _fail("num_generations", self.num_generations,
                  "expected an integer >= 2 (GRPO compares completions within a group of the same prompt)")
        _positive_int("per_device_train_batch_size", self.per_device_train_batch_size)
        _positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        _positive_int("num_iterations", self.num_iterations)
        self._check_num_processes()
        if self.steps_per_generation is not None:
            _positive_int("steps_per_generation", self.steps_per_generation)
        if self.generation_batch_size is not None:
            _positive_int("generation_batch_size", self.generation_batch_size)
        if self.max_prompt_length is not None:
            _positive_int("max_prompt_length", self.max_prompt_length)
        _number("temperature", self.temperature, 0.0, low_open=True)
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            _fail("top_k", self.top_k, "expected an integer >= 0 (0 or -1 disables top-k)")
        if self.min_p is not None:
            _number("min_p", self.min_p, 0.0, 1.0)
        _number("repetition_penalty", self.repetition_penalty, 0.0, low_open=True)
        validate_loss_fields(self)
        if self.reward_weights is not None:
            if not isinstance(self.reward_weights, (list, tuple)):
                _fail("reward_weights", self.reward_weights, "expected a list of numbers, one per reward function")
            for i, weight in enumerate(self.reward_weights):
                _number(f"reward_weights[{i}]", weight)
            self.reward_weights = [float(w) for w in self.reward_weights]
        _choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _choice("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, VLLM_IS_MODES)
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if high is not None:
            _number("vllm_importance_sampling_clip_max", high, 1.0, MAX_RATIO_BOUND,
                    why=f"a ratio bound above {MAX_RATIO_BOUND:g} never binds; None means no bound")
        if low is not None:
            _number("vllm_importance_sampling_clip_min", low, 0.0, 1.0)
            if high is not None and low >= high:
                _fail("vllm_importance_sampling_clip_min", low,
                      f"must be less than vllm_importance_sampling_clip_max ({high})")
        if (self.vllm_importance_sampling_correction and self.vllm_importance_sampling_mode.endswith("truncate")
                and low is None and high is None):
            _fail("vllm_importance_sampling_clip_max", high,
                  "a '*_truncate' mode needs vllm_importance_sampling_clip_min or _clip_max set")
        _positive_int("max_consecutive_nonfinite", self.max_consecutive_nonfinite)
        _boolean("dynamic_sampling", self.dynamic_sampling)
        _positive_int("dynamic_sampling_max_retries", self.dynamic_sampling_max_retries, 0)
        if self.logprob_chunk_size is not None:
            _positive_int("logprob_chunk_size", self.logprob_chunk_size)
        if self.activation_memory_gib is not None:
            _number("activation_memory_gib", self.activation_memory_gib, 0.0)
            if not self.gradient_checkpointing:
                _fail("activation_memory_gib", self.activation_memory_gib,
                      "it chooses which layers skip gradient checkpointing, so it needs gradient_checkpointing=True")
        for name in ("activation_offloading", "padding_free", "gradient_checkpointing", "shuffle_dataset",
                     "vllm_importance_sampling_correction", "log_completions", "overwrite_output_dir"):
            _boolean(name, getattr(self, name))
        if self.eval_steps is not None:
            _positive_int("eval_steps", self.eval_steps)
        _positive_int("per_device_eval_batch_size", self.per_device_eval_batch_size)
        _positive_int("logging_steps", self.logging_steps)
        _positive_int("save_steps", self.save_steps)
        if self.save_total_limit is not None:
            _positive_int("save_total_limit", self.save_total_limit)
        for target in self.report_to:
            _choice("report_to", target, REPORT_TO)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            _fail("output_dir", self.output_dir, "expected a directory path")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            _fail("seed", self.seed, f"expected an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}")
        _positive_int("ddp_timeout", self.ddp_timeout)

    def _check_num_processes(self) -> None:
        """``num_processes`` follows the launcher: torchrun's WORLD_SIZE, 1 for a plain ``python`` run. A value
        given explicitly must agree with it (a config written for 8 GPUs must not silently train on 1)."""
        launched, source = launched_processes()
        if self.num_processes is None:
            self.num_processes = launched
            return
        if isinstance(self.num_processes, bool) or not isinstance(self.num_processes, int) or self.num_processes < 1:
            _fail("num_processes", self.num_processes, "expected an integer >= 1, or None to follow the launcher")
        if self.num_processes != launched:
            _fail("num_processes", self.num_processes,
                  f"it must match how the job was launched: {launched} process{'es' if launched != 1 else ''} "
                  f"({source}); leave it unset to follow the launcher, or start "
                  f"{self.num_processes} processes with torchrun --nproc_per_node {self.num_processes} "
                  "-m rlcore.run ...")

    def _derive_batches(self) -> None:
        global_batch = self.per_device_train_batch_size * self.num_processes
        if self.steps_per_generation is not None and self.generation_batch_size is not None:
            raise ValueError("steps_per_generation and generation_batch_size can not both be set: set one, the "
                             "other follows (generation_batch_size = steps_per_generation × "
                             "per_device_train_batch_size × num_processes)")
        if self.generation_batch_size is not None:
            if self.generation_batch_size % global_batch:
                _fail("generation_batch_size", self.generation_batch_size,
                      f"must be divisible by per_device_train_batch_size × num_processes ({global_batch})")
            self.steps_per_generation = self.generation_batch_size // global_batch
        else:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            self.generation_batch_size = global_batch * self.steps_per_generation
        if self.generation_batch_size % self.num_generations:
            _fail("generation_batch_size", self.generation_batch_size,
                  f"the generation batch (steps_per_generation × per_device_train_batch_size × num_processes = "
                  f"{self.generation_batch_size}) must be divisible by num_generations ({self.num_generations}), "
                  "so that every prompt gets a whole group")
        per_process = self.steps_per_generation * self.per_device_train_batch_size
        if self.num_processes > 1 and per_process % self.num_generations:
            _fail("per_device_train_batch_size", self.per_device_train_batch_size,
                  f"each of the {self.num_processes} processes generates whole groups: its share of a generation "
                  f"(steps_per_generation × per_device_train_batch_size = {per_process}) must be divisible by "
                  f"num_generations ({self.num_generations})")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon

    @property
    def prompts_per_generation(self) -> int:
        """Unique prompts sampled per generation: ``generation_batch_size / num_generations``."""
        return self.generation_batch_size // self.num_generations

    @property
    def effective_batch_size(self) -> int:
        """``steps_per_generation × num_processes × per_device_train_batch_size``."""
        return self.steps_per_generation * self.num_processes * self.per_device_train_batch_size


@dataclass
class ModelConfig(_Serializable):
    """Which model, in which precision, with which LoRA, on which rollout engine.

    ``model_name_or_path`` is a local directory or a Hub id; the special value ``"tiny"`` builds the tiny
    random Llama-3-architecture model from :mod:`rlcore.tiny_model` (CPU tests, examples).
    """

    model_name_or_path: str = "tiny"
    dtype: str = "bfloat16"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    lora_adapter_path: str | None = None  # continue training an existing PEFT adapter
    max_seq_length: int = 2048
    engine: str = "auto"
    gpu_memory_utilization: float = 0.9
    standby: bool = True
    enforce_eager: bool = False
    kernels: bool = True  # on CUDA: rlcore.kernels' RoPE / SwiGLU / RMSNorm / LoRA-linear in the trainer's model
    # torch's CPU threads (torch.set_num_threads, for the whole process) when the model runs on the CPU; None:
    # torch's default. Small models want 1: their matrices are too small to split, and on a busy CPU the
    # waiting threads make every step several times slower.
    cpu_threads: int | None = None
    load_format: str = "auto"  # vLLM's load_format; "dummy": random weights of config.json's shapes (benchmarks)
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    load_in_fp8: bool = False  # another name for dtype="float8" (read at construction, then dtype says it)

    def __post_init__(self) -> None:
        if not isinstance(self.model_name_or_path, str) or not self.model_name_or_path:
            _fail("model_name_or_path", self.model_name_or_path, "expected a local directory, a Hub id, or 'tiny'")
        if not isinstance(self.load_in_fp8, bool):
            _fail("load_in_fp8", self.load_in_fp8, "expected True or False")
        if self.load_in_fp8:
            if self.dtype not in ("bfloat16", "float8"):
                _fail("load_in_fp8", True, f"it means dtype='float8', and dtype={self.dtype!r} was also given")
            # consumed here, so that copies and saved configs (replace, to_dict) carry dtype alone
            self.dtype, self.load_in_fp8 = "float8", False
        _choice("dtype", self.dtype, DTYPES)
        _positive_int("lora_r", self.lora_r)
        _number("lora_alpha", self.lora_alpha, 0.0, low_open=True)
        _number("lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            _fail("target_modules", self.target_modules, "expected a non-empty list of module names, e.g. "
                  + ", ".join(DEFAULT_TARGET_MODULES))
        self.target_modules = list(self.target_modules)
        _positive_int("max_seq_length", self.max_seq_length, 8)
        _choice("engine", self.engine, ENGINES)
        _choice("load_format", self.load_format, LOAD_FORMATS)
        if self.load_format == "dummy" and self.engine == "hf":
            _fail("load_format", self.load_format, "'dummy' weights exist only in vLLM (engine='vllm' or 'auto')")
        _number("gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, low_open=True)
        if self.cpu_threads is not None:
            _positive_int("cpu_threads", self.cpu_threads)

    @property
    def torch_dtype(self):
        import torch

        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "float8": torch.bfloat16}[self.dtype]
