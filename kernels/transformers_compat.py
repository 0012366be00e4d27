"""Every use of transformers internals (private attributes, module layouts, constructor signatures), in one place.

Written against transformers 5.17 (the GPU runs) and 5.24 (CPU); ``models/llama/modeling_llama.py`` and
``modeling_layers.GradientCheckpointingLayer`` are the same in both for the parts used here. Importing this
module warns once when the installed transformers is outside that range. Where an attribute is missing the
functions raise ``RuntimeError`` naming it rather than compute something else.

It lives in ``rlcore.kernels`` (not ``rlcore``) because the kernels package must not import the rest of
rlcore; ``rlcore`` itself imports it from here. transformers is imported lazily (only when a function runs),
so importing the kernels stays cheap.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

import torch
from torch import nn

from .torch_compat import in_tested_range

TESTED_RANGE = ((5, 17), (5, 24))  # inclusive (major, minor)
# transformers 5.2x renames ``is_gradient_checkpointing`` and warns when it is read (peft 0.21 reads it)
RENAMED_CHECKPOINTING_WARNING = ".*is_gradient_checkpointing.*"


def check_version(version: str | None = None) -> bool:
    """True when ``version`` (default: the installed one) is in :data:`TESTED_RANGE`; warns otherwise."""
    if version is None:
        try:
            version = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            return False
    return in_tested_range("transformers", version, TESTED_RANGE, "rlcore/kernels/transformers_compat.py")


check_version()


# ------------------------------------------------------------------ Llama modules (models/llama/modeling_llama.py)
def llama_classes() -> tuple[type, type, type]:
    """(``LlamaRMSNorm``, ``LlamaMLP``, ``LlamaAttention``)."""
    from transformers.models.llama import modeling_llama

    return modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP, modeling_llama.LlamaAttention


def require_attributes(module: nn.Module, names: tuple[str, ...], layout: str = "transformers 5.17 – 5.24 Llama"
                       ) -> None:
    """Raises ``RuntimeError`` when ``module`` lacks one of ``names`` (the layout rlcore's forwards read)."""
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise RuntimeError(f"{type(module).__name__} has no {missing}: the installed version differs from the "
                           f"{layout} layout rlcore.kernels was written for")


def attention_interface(module: nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The attention kernel a Llama attention module would call: ``ALL_ATTENTION_FUNCTIONS`` looked up by the
    private ``config._attn_implementation``, ``eager_attention_forward`` when not registered."""
    from transformers.models.llama.modeling_llama import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

    return ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)


@contextlib.contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    """Sets the private ``config._attn_implementation`` to ``name`` for the duration of the block.

    ``create_causal_mask`` (5.17 – 5.24) builds no mask for an implementation it has no mask function for;
    that is how a kernel that reads ``cu_seqlens`` instead of a mask opts out of a [T, T] mask.
    """
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


# ------------------------------------------------------------------ gradient checkpointing (modeling_layers.py)
def layer_has_checkpointing_function(layer: nn.Module) -> bool:
    """Whether ``gradient_checkpointing_enable`` installed its function on ``layer`` (the private
    ``GradientCheckpointingLayer._gradient_checkpointing_func``)."""
    return getattr(layer, "_gradient_checkpointing_func", None) is not None


def is_checkpointing_layer(layer: nn.Module) -> bool:
    """A ``GradientCheckpointingLayer``: its ``gradient_checkpointing`` flag is read on every call."""
    return hasattr(layer, "gradient_checkpointing")


def set_layer_checkpointing(layer: nn.Module, enabled: bool) -> None:
    """Turns gradient checkpointing of one decoder layer on or off (its per-call ``gradient_checkpointing``)."""
    layer.gradient_checkpointing = bool(enabled)


def layer_checkpointing(layer: nn.Module) -> bool:
    return bool(layer.gradient_checkpointing)


@contextlib.contextmanager
def quiet_renamed_checkpointing_warning() -> Iterator[None]:
    """Silences transformers' FutureWarning about the renamed ``is_gradient_checkpointing`` (not ours to act
    on: peft and transformers' own ``gradient_checkpointing_enable`` read the old name)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RENAMED_CHECKPOINTING_WARNING, category=FutureWarning)
        yield


# ------------------------------------------------------------------ building models around other tensors
def rebuild_rotary_embedding(module: nn.Module, config: Any, device: torch.device) -> nn.Module:
    """A fresh copy of a rotary-embedding module, its buffers computed on ``device``.

    transformers 5.x builds the rotary table from the config alone (``type(module)(config=config)``; older
    releases took ``device=``). Used for models built on the meta device, whose buffers are placeholders.
    """
    with torch.device(device):
        fresh = type(module)(config=config)
    return fresh.to(device)


def name_or_path(config: Any) -> str:
    """Where a model was loaded from: the private ``PretrainedConfig._name_or_path`` ("" when unknown)."""
    return str(getattr(config, "_name_or_path", "") or "")


def config_without_quantization(path: str, trust_remote_code: bool = False) -> Any:
    """The config of checkpoint ``path`` with its ``quantization_config`` attribute removed.

    ``from_pretrained(path, config=...)`` picks its quantizer from the ``quantization_config`` of the config it is
    given (``quantizers/auto.py: get_hf_quantizer``, 5.17 – 5.24); without one it loads the stored tensors into an
    ordinary model, which is how rlcore reads an FP8 checkpoint without transformers' own FP8 integration (which
    needs a GPU and would own the FP8 layers). Raises ``RuntimeError`` if the attribute can not be removed.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "quantization_config", None) is not None:
        raise RuntimeError(f"{type(config).__name__}.quantization_config could not be removed: the installed "
                           "transformers differs from the 5.17 – 5.24 configs rlcore was written for")
    return config
