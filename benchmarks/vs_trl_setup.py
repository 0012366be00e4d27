"""What both sides of ``benchmarks/vs_trl.py`` run: settings, both frameworks' configs, prompts, reward, model files.

Everything here is importable without a GPU, vLLM or a model, so the claim "both frameworks get identical
settings" is checked on a CPU (``tests/test_vs_trl.py``): :func:`rlcore_configs` and :func:`trl_config` are the
only places the benchmark's configs are built, and :func:`setting_mismatches` compares them field by field.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_STD = 0.02  # transformers' initializer_range for Llama
WRITER_VERSION = 1  # part of the model directory's manifest: bump when the written bytes change
MANIFEST = "vs_trl_manifest.json"

# The algorithm, identical on both sides. Names are shared by rlcore's and TRL's GRPOConfig.
ALGORITHM: dict[str, Any] = {
    "learning_rate": 1e-6,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "lr_scheduler_type": "linear",
    "optim": "adamw_torch",
    "num_iterations": 1,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "repetition_penalty": 1.0,
    "beta": 0.0,
    "epsilon": 0.2,
    "importance_sampling_level": "token",
    "loss_type": "dapo",
    "scale_rewards": "group",
    "mask_truncated_completions": False,
    "top_entropy_quantile": 1.0,
    "vllm_importance_sampling_correction": True,
    "vllm_importance_sampling_mode": "sequence_mask",
    "vllm_importance_sampling_clip_max": 3.0,
    "gradient_checkpointing": True,
    "shuffle_dataset": False,  # both take the prompts in dataset order
    "seed": 42,
}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}


@dataclass(frozen=True)
class Setting:
    """One GRPO step's shape: ``num_prompts`` prompts × ``num_generations`` completions of exactly
    ``completion_length`` tokens after a ``prompt_length``-token prompt, trained ``micro_batch`` sequences at a
    time. With ``accumulate`` (the benchmark) one optimizer step consumes the whole generation
    (``gradient_accumulation_steps = steps_per_generation``); without it (the longest-completion probes) one
    optimizer step trains one micro-batch of the generation, which sets the same memory peak at a fraction of
    the time."""

    name: str
    num_prompts: int
    num_generations: int
    completion_length: int
    prompt_length: int = 128
    micro_batch: int = 8
    accumulate: bool = True

    def __post_init__(self) -> None:
        for name in ("num_prompts", "num_generations", "completion_length", "prompt_length", "micro_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Setting.{name}={value!r}: expected a positive integer")
        if self.num_generations < 2:
            raise ValueError(f"Setting.num_generations={self.num_generations}: GRPO needs at least 2")
        if self.generation_batch % self.micro_batch:
            raise ValueError(f"Setting.micro_batch={self.micro_batch} must divide the generation batch "
                             f"({self.num_prompts} × {self.num_generations} = {self.generation_batch})")

    @property
    def generation_batch(self) -> int:
        return self.num_prompts * self.num_generations

    @property
    def steps_per_generation(self) -> int:
        return self.generation_batch // self.micro_batch

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.steps_per_generation if self.accumulate else 1

    @property
    def max_model_len(self) -> int:
        return self.prompt_length + self.completion_length


SETTINGS = {
    "16x8x512": Setting("16x8x512", num_prompts=16, num_generations=8, completion_length=512, micro_batch=8),
    "1x8x4096": Setting("1x8x4096", num_prompts=1, num_generations=8, completion_length=4096, micro_batch=1),
}


def probe_setting(completion_length: int, num_generations: int = 8) -> Setting:
    """The longest-completion probe: 1 prompt × ``num_generations`` completions (8, the benchmark's, unless
    given; at least 2) of ``completion_length``, one sequence per micro-batch, one micro-batch trained, so the
    training-phase peak does not depend on the count while the no-grad log-prob pass (over every completion)
    takes time in proportion to it."""
    return Setting(f"1x{num_generations}x{completion_length}", num_prompts=1, num_generations=num_generations,
                   completion_length=completion_length, micro_batch=1, accumulate=False)


# ---------------------------------------------------------------------- configs
def rlcore_configs(setting: Setting, model_dir: str, output_dir: str, max_steps: int, *,
                   gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                   overrides: dict[str, Any] | None = None):
    """rlcore's (ModelConfig, GRPOConfig) for ``setting``: vLLM with shared weights and standby, kernels on.

    ``overrides`` are extra ``GRPOConfig`` / ``ModelConfig`` fields (e.g. ``activation_memory_gib``); a name
    that is neither raises ``ValueError``.
    """
    from rlcore.config import GRPOConfig, ModelConfig

    model_fields = dict(
        model_name_or_path=model_dir, dtype="bfloat16", lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"], target_modules=list(LORA_TARGETS), max_seq_length=setting.max_model_len,
        engine="vllm", gpu_memory_utilization=gpu_memory_utilization, standby=True, enforce_eager=enforce_eager,
        kernels=True, load_format="safetensors", attn_implementation="sdpa")
    grpo_fields = dict(
        ALGORITHM, num_generations=setting.num_generations, per_device_train_batch_size=setting.micro_batch,
        gradient_accumulation_steps=setting.gradient_accumulation_steps,
        steps_per_generation=setting.steps_per_generation, max_prompt_length=setting.prompt_length,
        max_completion_length=setting.completion_length, max_steps=max_steps, output_dir=output_dir,
        save_steps=10**9, logging_steps=1, report_to="none")
    model_names, grpo_names = set(ModelConfig.__dataclass_fields__), set(GRPOConfig.__dataclass_fields__)
    for key, value in (overrides or {}).items():
        if key in model_names:
            model_fields[key] = value
        elif key in grpo_names:
            grpo_fields[key] = value
        else:
            raise ValueError(f"rlcore override {key!r} is neither a GRPOConfig nor a ModelConfig field")
    return ModelConfig(**model_fields), GRPOConfig(**grpo_fields)


def trl_config(setting: Setting, output_dir: str, max_steps: int, *, gpu_memory_utilization: float = 0.8,
               **extra: Any):
    """TRL 1.16's GRPOConfig for ``setting``: colocated vLLM with sleep mode, bf16, gradient checkpointing.

    ``gpu_memory_utilization`` is vLLM's share of the whole GPU *next to* the training model's own copy of the
    weights, which is already on the GPU when vLLM starts (vLLM refuses a share larger than the free memory).
    ``extra`` overrides any GRPOConfig field (``use_cpu=True`` builds it on a machine without a GPU).
    """
    from trl import GRPOConfig

    fields = dict(
        ALGORITHM, output_dir=output_dir, max_steps=max_steps,
        num_generations=setting.num_generations, per_device_train_batch_size=setting.micro_batch,
        gradient_accumulation_steps=setting.gradient_accumulation_steps,
        steps_per_generation=setting.steps_per_generation, max_completion_length=setting.completion_length,
        bf16=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "sdpa"},
        use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True,
        vllm_gpu_memory_utilization=gpu_memory_utilization, vllm_max_model_length=setting.max_model_len,
        # rlcore's benchmark engine also ignores EOS: every completion is exactly completion_length tokens
        generation_kwargs={"ignore_eos": True},
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    fields.update(extra)
    return GRPOConfig(**fields)


def trl_lora_config():
    """The PEFT LoRA both sides train: r 16, alpha 32, no dropout, all 7 projections."""
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                      target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")


def _plain(value: Any) -> Any:
    """Enum members (TRL's lr_scheduler_type / optim) as their string value."""
    return getattr(value, "value", value)


SHARED_NAMES = (*ALGORITHM, "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
                "steps_per_generation", "generation_batch_size", "max_completion_length", "max_steps",
                "vllm_importance_sampling_clip_min", "delta", "off_policy_mask_threshold")


def _same_name(name: str):
    return name, lambda model, grpo: getattr(grpo, name), lambda trl, lora: _plain(getattr(trl, name))


# (what, rlcore's value from (ModelConfig, GRPOConfig), TRL's value from (GRPOConfig, LoraConfig)): the settings
# the comparison depends on.
SETTING_PAIRS = (
    *(_same_name(name) for name in SHARED_NAMES),
    ("epsilon_high", lambda model, grpo: grpo.epsilon_high,
     lambda trl, lora: trl.epsilon if trl.epsilon_high is None else trl.epsilon_high),
    ("min_p", lambda model, grpo: grpo.min_p or 0.0, lambda trl, lora: trl.min_p or 0.0),
    ("bf16", lambda model, grpo: model.dtype == "bfloat16", lambda trl, lora: bool(trl.bf16)),
    ("non-reentrant checkpointing", lambda model, grpo: True,  # rlcore's trainer always checkpoints non-reentrantly
     lambda trl, lora: (trl.gradient_checkpointing_kwargs or {}).get("use_reentrant") is False),
    ("attention", lambda model, grpo: model.attn_implementation,
     lambda trl, lora: trl.model_init_kwargs["attn_implementation"]),
    ("max_model_len", lambda model, grpo: model.max_seq_length, lambda trl, lora: trl.vllm_max_model_length),
    ("engine releases memory between phases", lambda model, grpo: model.standby,
     lambda trl, lora: trl.vllm_enable_sleep_mode),
    ("lora r", lambda model, grpo: model.lora_r, lambda trl, lora: lora.r),
    ("lora alpha", lambda model, grpo: model.lora_alpha, lambda trl, lora: lora.lora_alpha),
    ("lora dropout", lambda model, grpo: model.lora_dropout, lambda trl, lora: lora.lora_dropout),
    ("lora targets", lambda model, grpo: sorted(model.target_modules), lambda trl, lora: sorted(lora.target_modules)),
)


def settings_view(framework: str, first, second) -> dict[str, Any]:
    """The values of :data:`SETTING_PAIRS` as one framework sees them: ``("rlcore", ModelConfig, GRPOConfig)``
    or ``("trl", GRPOConfig, LoraConfig)``. JSON-friendly, so each run records what it was given."""
    side = 1 if framework == "rlcore" else 2
    return {pair[0]: _plain(pair[side](first, second)) for pair in SETTING_PAIRS}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
    return a == b


def view_mismatches(rlcore_view: dict[str, Any], trl_view: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Every (setting, rlcore value, TRL value) that differs between two :func:`settings_view` results."""
    return [(name, rlcore_view.get(name), trl_view.get(name)) for name in dict.fromkeys([*rlcore_view, *trl_view])
            if not _same(rlcore_view.get(name), trl_view.get(name))]


def setting_mismatches(model_config, grpo_config, trl_grpo_config, lora_config) -> list[tuple[str, Any, Any]]:
    """Every (setting, rlcore value, TRL value) of :data:`SETTING_PAIRS` that differs; empty when identical."""
    return view_mismatches(settings_view("rlcore", model_config, grpo_config),
                           settings_view("trl", trl_grpo_config, lora_config))


# ---------------------------------------------------------------------- prompts and reward
_WORDS = ("apples", "river", "market", "seven", "garden", "train", "letters", "morning", "books", "answer",
          "cookies", "school", "bakery", "tickets", "twelve", "problem", "friends", "minutes", "pencils", "money",
          "stamps", "bottles", "farmer", "eggs", "shirts", "library", "park", "flowers", "candies", "boxes")


def make_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[str]:
    """``count`` distinct plain-text prompts that each tokenize to exactly ``length`` ids (BOS included).

    Words are added while they fit, then single-token `` a`` fillers: with Llama-3's pre-tokenizer each filler
    is its own piece, so it adds exactly one id. Raises ``ValueError`` if a prompt comes out another length.
    """
    rng = random.Random(seed)

    def size(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True)["input_ids"])

    prompts = []
    for index in range(count):
        text = f"Prompt {index}:"
        while True:
            candidate = f"{text} {rng.choice(_WORDS)}"
            if size(candidate) > length - 2:
                break
            text = candidate
        while size(text) < length:
            text += " a"
        if size(text) != length:
            raise ValueError(f"prompt {index} tokenizes to {size(text)} ids, expected {length}")
        prompts.append(text)
    return prompts


def parity_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """Share of even token ids in each completion, ``r_i = |{t ∈ c_i : t mod 2 = 0}| / |c_i|``.

    Deterministic and cheap; both trainers pass ``completion_ids`` (TRL's reward signature). It varies within
    a group of random completions, so advantages are not all zero.
    """
    if completion_ids is None:
        raise ValueError("parity_reward needs completion_ids (both rlcore and TRL pass them)")
    return [sum(1 for token in ids if int(token) % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


# ---------------------------------------------------------------------- model files
def _rlcore_model_helpers():
    """rlcore's tiny-model module."""
    from rlcore import tiny_model

    return tiny_model


def llama_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight of a ``LlamaForCausalLM`` with untied embeddings: name → shape, in checkpoint order."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        shapes.update({
            f"{prefix}.self_attn.q_proj.weight": (heads * head_dim, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, heads * head_dim),
            f"{prefix}.mlp.gate_proj.weight": (inter, hidden),
            f"{prefix}.mlp.up_proj.weight": (inter, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, inter),
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    if config.get("tie_word_embeddings"):
        raise ValueError("tie_word_embeddings=True is not supported: Llama-3-8B has a separate lm_head")
    shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def _shard_of(name: str) -> str:
    """Embeddings, then one file per decoder layer, then the final norm and lm_head: at 8B shapes no file is
    over ~1 GB, so writing never holds more than one layer in host memory."""
    if name.startswith("model.layers."):
        return f"layer-{int(name.split('.')[2]):03d}"
    return "embed" if name.startswith("model.embed_tokens") else "head"


def random_tensor(name: str, shape: tuple[int, ...], seed: int, device: str = "cpu", dtype=None):
    """The weight ``name`` of the random model: normal(0, 0.02) for matrices, ones for norm vectors.

    Its generator is seeded from ``seed`` and the name alone, so a tensor's values do not depend on which
    tensors were written before it (on one device type: CPU and CUDA generators differ).
    """
    import torch

    dtype = dtype or torch.bfloat16
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, WEIGHT_STD, generator=generator)


def write_random_weights(directory: str, config: dict[str, Any], seed: int, device: str = "cpu") -> int:
    """Writes bf16 safetensors shards + ``model.safetensors.index.json`` for ``config``; returns the bytes."""
    from safetensors.torch import save_file

    shapes = llama_tensor_shapes(config)
    shards: dict[str, list[str]] = {}
    for name in shapes:
        shards.setdefault(_shard_of(name), []).append(name)
    weight_map, total = {}, 0
    for number, names in enumerate(shards.values(), start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name], seed, device).cpu() for name in names}
        save_file(tensors, os.path.join(directory, filename), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
    return total


@dataclass
class ModelDir:
    path: str
    bytes: int
    reused: bool
    manifest: dict[str, Any] = field(default_factory=dict)


def prepare_model_dir(path: str, layers: int | None = None, seed: int = 0, device: str = "cpu") -> ModelDir:
    """A Llama-3-8B-shaped model directory (config.json, the tiny tokenizer, random bf16 safetensors) at ``path``.

    An existing directory with the same manifest (config, seed, device type, writer version) is reused. A new
    one is written under a temporary name and renamed into place, so an interrupted write is never mistaken
    for a model.
    """
    helpers = _rlcore_model_helpers()
    config = dict(helpers.LLAMA3_8B_CONFIG)
    if layers:
        config["num_hidden_layers"] = layers
    wanted = {"writer": WRITER_VERSION, "seed": seed, "device_type": device.split(":")[0],
              "num_hidden_layers": config["num_hidden_layers"]}
    manifest_path = os.path.join(path, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as handle:
            found = json.load(handle)
        if {k: found.get(k) for k in wanted} == wanted:
            return ModelDir(path, int(found.get("bytes", 0)), True, found)
    staging = path.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    helpers.write_llama3_8b_dummy_dir(staging, layers=layers, with_tokenizer=True)
    with open(os.path.join(staging, "config.json"), encoding="utf-8") as handle:
        written_config = json.load(handle)
    total = write_random_weights(staging, written_config, seed, device)
    manifest = dict(wanted, bytes=total)
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(staging, path)
    return ModelDir(path, total, False, manifest)
