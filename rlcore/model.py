"""Loading the policy: base model (or vLLM's live weights), LoRA adapters, tokenizer and rollout engine."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from rlcore.config import GRPOConfig, ModelConfig
from rlcore.model_source import (
    ModelLoadError,
    check_checkpoint_precision,
    hub_unreachable,
    model_source,
    resolve_model_path,
)
from rlcore.rollout import RolloutEngine

logger = logging.getLogger("rlcore")


@dataclass
class Policy:
    """What training needs: the LoRA-wrapped model, its tokenizer and the engine that samples from it."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    engine: RolloutEngine
    model_path: str


def choose_engine(model_config: ModelConfig) -> str:
    """``"vllm"`` or ``"hf"``: "auto" picks vLLM when it is importable and a CUDA GPU is present."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    has_cuda = torch.cuda.is_available()
    if model_config.engine == "vllm":
        if not (has_vllm and has_cuda):
            raise ValueError("engine='vllm' needs vllm installed (pip install 'rlcore[vllm]') and a CUDA GPU; "
                             f"found vllm={'yes' if has_vllm else 'no'}, cuda={'yes' if has_cuda else 'no'}. "
                             "Use engine='hf' (transformers generate) instead.")
        return "vllm"
    if model_config.engine == "hf":
        return "hf"
    chosen = "vllm" if has_vllm and has_cuda else "hf"
    logger.info("engine='auto' chose %s (vllm importable: %s, CUDA: %s)", chosen, has_vllm, has_cuda)
    return chosen


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_not_found_message(path, error)) from None
    if tokenizer.pad_token_id is None:
        # Llama-3 ships no pad token; any id works because padded positions are masked everywhere.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(model_config: ModelConfig, grpo_config: GRPOConfig | None = None) -> Policy:
    """Builds the LoRA policy and its rollout engine as ``model_config`` says."""
    if model_source(model_config.model_name_or_path) == "hub":
        unreachable = hub_unreachable()
        if unreachable:  # fail now rather than after every download retry
            raise ModelLoadError(f"model {model_config.model_name_or_path!r} is not on this machine and can not be "
                                 f"downloaded: the Hugging Face Hub is not reachable ({unreachable}). Use a local "
                                 "model directory, or 'tiny' for the tiny random test model.")
    path = resolve_model_path(model_config.model_name_or_path)
    check_checkpoint_precision(path, model_config.dtype)
    tokenizer = load_tokenizer(path, model_config.trust_remote_code)
    engine_name = choose_engine(model_config)
    if model_config.load_format == "dummy" and engine_name != "vllm":
        raise ValueError("load_format='dummy' needs the vLLM engine (vllm installed and a CUDA GPU)")
    if engine_name == "vllm":
        from rlcore.vllm_engine import VLLMEngine

        engine = VLLMEngine(model_config.replace(model_name_or_path=path), grpo_config, tokenizer,
                            load_format=model_config.load_format)
        base = engine.build_shared_model()
        model = add_lora(base, model_config)
        engine.attach_policy(model)
    else:
        base = load_base_model(path, model_config)
        model = add_lora(base, model_config)
        from rlcore.hf_engine import HFEngine

        engine = HFEngine(model, tokenizer)
    prepare_for_training(model, model_config, grpo_config)
    logger.info("policy: %s, engine %s, %s trainable parameters", path, engine_name,
                f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    return Policy(model=model, tokenizer=tokenizer, engine=engine, model_path=path)


def policy_from_module(module: torch.nn.Module, tokenizer: Any, model_config: ModelConfig | None = None,
                       grpo_config: GRPOConfig | None = None, engine: RolloutEngine | None = None) -> Policy:
    """A policy around a causal LM the caller built, set up for training exactly as :func:`load_policy` does.

    A plain module gets frozen and LoRA-wrapped as ``model_config`` says; a ``peft.PeftModel`` is used as it
    is. Without ``engine`` the policy samples from itself (:class:`~rlcore.hf_engine.HFEngine`).
    """
    from peft import PeftModel

    if tokenizer is None:
        raise ValueError("processing_class (the tokenizer) is required when model is an already built module")
    model_config = model_config or ModelConfig()
    model = module
    if not isinstance(model, PeftModel):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model = add_lora(model, model_config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if engine is None:
        from rlcore.hf_engine import HFEngine

        engine = HFEngine(model, tokenizer)
    prepare_for_training(model, model_config, grpo_config)
    from rlcore.kernels.transformers_compat import name_or_path

    return Policy(model=model, tokenizer=tokenizer, engine=engine, model_path=name_or_path(model.config))


def prepare_for_training(model: Any, model_config: ModelConfig, grpo_config: GRPOConfig | None) -> None:
    """What every policy gets before training: a float32 residual stream when its frozen weights are float16,
    gradient checkpointing (``grpo_config.gradient_checkpointing``),
    rlcore's kernels on CUDA (``model_config.kernels``), and the layers left out of recomputation
    (``grpo_config.activation_memory_gib``), and on the CPU ``model_config.cpu_threads``."""
    if model_config.cpu_threads is not None and not next(model.parameters()).is_cuda:
        torch.set_num_threads(model_config.cpu_threads)
    if has_float16_weights(model):
        # the residual stream is what passes float16's 65,504 first, so it stays float32: here for every way a
        # policy is built (a loaded checkpoint, vLLM's shared weights, a module the caller built); before the
        # kernels, which keep the hooks; idempotent
        from rlcore.kernels.fp16_stability import keep_residual_fp32

        keep_residual_fp32(model)
    if grpo_config is not None and grpo_config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if model_config.kernels and next(model.parameters()).is_cuda:
        from rlcore.kernels import apply_kernels

        logger.info("kernels applied to the training model: %s", apply_kernels(model, lora=True))
    if grpo_config is not None and grpo_config.activation_memory_gib is not None:
        plan_recompute(model, grpo_config)


def has_float16_weights(model: torch.nn.Module) -> bool:
    """Whether the policy's frozen weights are float16: it then keeps its residual stream in float32
    (:func:`prepare_for_training`) and the trainer scales its loss dynamically."""
    return any(p.dtype == torch.float16 for p in model.parameters() if not p.requires_grad)


def compute_dtype(model_config: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype the HF path computes in: 16-bit on GPU, float32 on CPU (16-bit matmuls there are slow and
    too coarse to see a tiny model learn)."""
    if device.type == "cpu":
        return torch.float32
    return model_config.torch_dtype


def load_base_model(path: str, model_config: ModelConfig):
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(model_config, device)
    try:
        if model_config.dtype == "float8":  # FP8Linear projections (bf16 compute on every device), the rest bf16
            from rlcore.fp8_checkpoint import load_fp8_model

            model = load_fp8_model(path, model_config.attn_implementation, model_config.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=model_config.attn_implementation,
                trust_remote_code=model_config.trust_remote_code)
    except OSError as error:
        raise ModelLoadError(_not_found_message(path, error)) from None
    model.to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def add_lora(base, model_config: ModelConfig):
    """Wraps ``base`` with trainable LoRA adapters (new, or loaded from ``model_config.lora_adapter_path``)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if model_config.lora_adapter_path:
        if not os.path.isfile(os.path.join(model_config.lora_adapter_path, "adapter_config.json")):
            raise ValueError(f"lora_adapter_path={model_config.lora_adapter_path!r} has no adapter_config.json; "
                             "expected a PEFT adapter directory (e.g. a checkpoint's adapter/ folder)")
        return PeftModel.from_pretrained(base, model_config.lora_adapter_path, is_trainable=True)
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [m for m in model_config.target_modules if m not in names]
    if missing:
        raise ValueError(f"target_modules {missing} are not modules of this model; it has e.g. "
                         + ", ".join(sorted(n for n in names if n.endswith("proj"))[:8]))
    lora = LoraConfig(r=model_config.lora_r, lora_alpha=model_config.lora_alpha,
                      lora_dropout=model_config.lora_dropout, target_modules=list(model_config.target_modules),
                      bias="none", task_type="CAUSAL_LM")
    from rlcore.kernels.transformers_compat import quiet_renamed_checkpointing_warning

    with quiet_renamed_checkpointing_warning():  # peft 0.21 reads the renamed is_gradient_checkpointing
        return get_peft_model(base, lora)


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant checkpointing works with frozen embeddings (no need to force input grads).
    import warnings

    with warnings.catch_warnings():
        # transformers 5.x renames it (activation_checkpointing_*); the old name works on every version we support
        warnings.simplefilter("ignore", FutureWarning)
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.get_base_model().config.use_cache = False


def plan_recompute(model, grpo_config: GRPOConfig, probe_tokens: int = 256) -> list[int]:
    """Leaves as many decoder layers out of gradient checkpointing as ``activation_memory_gib`` allows at the
    largest micro-batch (per_device_train_batch_size × (max_prompt_length + max_completion_length) tokens).

    What one layer saves is measured on a probe of ``probe_tokens`` tokens and scaled linearly (attention
    through SDPA / flash keeps no [L × L] tensor); returns the indices of the layers left out.
    """
    from rlcore.kernels.recompute import (decoder_layers, plan_checkpointing, saved_bytes_per_layer,
                                          set_checkpointed_layers)

    device = next(model.parameters()).device
    probe = torch.zeros(1, probe_tokens, dtype=torch.long, device=device)
    memory = saved_bytes_per_layer(model, probe)
    length = (grpo_config.max_prompt_length or grpo_config.max_completion_length) + grpo_config.max_completion_length
    tokens = grpo_config.per_device_train_batch_size * length
    scale = tokens / probe_tokens
    per_layer = memory.saving * scale
    num_layers = len(decoder_layers(model))
    left_out = plan_checkpointing(num_layers, memory, grpo_config.activation_memory_gib * 2**30 / scale)
    chosen = set_checkpointed_layers(model, left_out)
    logger.info("activation_memory_gib=%s: %d of %d layers not recomputed (%.2f GiB each at %d tokens)",
                grpo_config.activation_memory_gib, left_out, num_layers, per_layer / 2**30, tokens)
    return chosen


def _not_found_message(path: str, error: Exception) -> str:
    return (f"could not load model {path!r}: it is not a local model directory and it could not be "
            f"downloaded ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
            "Point at a local copy with --set model=/path/to/model-dir (a folder with config.json, weights and "
            "tokenizer files), or use --set model=tiny for the tiny random test model.")
