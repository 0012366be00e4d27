"""Per-tensor FP8 Llama checkpoints: writing one from a 16-bit checkpoint, and the transformers model's FP8 layers.

The format is the one vLLM reads as ``quantization_config = {"quant_method": "fp8", "activation_scheme":
"dynamic"}`` (``Fp8Config`` / ``Fp8LinearMethod``): each decoder projection
``model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}`` stores ``weight`` as ``float8_e4m3fn``
[out, in] and ``weight_scale`` as one float32 value (shape []), ``W ≈ weight · weight_scale``; embeddings,
norms and lm_head keep their 16-bit (or float32) tensors. Activations are quantized as they arrive, per token,
on both sides (vLLM's kernels, :class:`rlcore.kernels.fp8_linear.FP8Linear`).

* :func:`write_fp8_checkpoint` (and ``python -m rlcore.fp8_checkpoint SOURCE TARGET``) writes one;
* :func:`fp8_checkpoint_format` says whether a directory is one (and refuses FP8 variants rlcore can not train
  on identically to vLLM: static activation scales, block scales);
* :func:`load_fp8_model` builds the transformers model with FP8 layers (the HF engine's path with
  ``dtype="float8"``): the checkpoint's own FP8 bytes and scales for an FP8 checkpoint, or the 16-bit weights
  quantized as they load by the same :func:`quantize_per_tensor` the writer uses, so that both give the same
  layers.

With the vLLM engine nothing here runs at load time: vLLM reads the checkpoint itself, requantizes the shards of
its fused ``qkv_proj`` / ``gate_up_proj`` to the largest shard scale, and the trainer's layers are views of
those tensors (:mod:`rlcore.fp8_weights`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any

import torch
from torch import nn

from rlcore.kernels.fp8_linear import FP8_DTYPE, FP8Linear, quantize_fp8_reference
from rlcore.model_source import (
    ModelLoadError,
    checkpoint_quantization,
    fp8_checkpoint_format,
)

__all__ = [
    "QUANTIZATION_CONFIG",
    "fp8_checkpoint_format",
    "is_quantized_projection",
    "load_fp8_model",
    "quantize_per_tensor",
    "read_fp8_projections",
    "write_fp8_checkpoint",
]

QUANTIZATION_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic"}
SCALE_SUFFIX = "_scale"  # "<module>.weight" → "<module>.weight_scale"
INDEX_NAME = "model.safetensors.index.json"
# what a checkpoint directory holds besides its weights and config.json is copied as it is (tokenizer,
# generation config, chat template, ...); other weight formats are not
_NOT_COPIED = re.compile(r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.bin\.index\.json|\.pt|\.pth|\.gguf"
                         r"|\.h5|\.msgpack|^config\.json)$")
_PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def is_quantized_projection(module_name: str) -> bool:
    """Whether transformers module ``module_name`` is one of the 7 projections of a Llama decoder layer (what the
    FP8 format quantizes; vLLM quantizes the same ones, fused)."""
    return _PROJECTION.match(module_name) is not None


def quantize_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)`` with ``weight ≈ q.float() · s``, one float32 scale for the whole tensor::

        s = max(amax(|W|), 1e-12) / 448        (an all-zero W gets a tiny s and quantizes to zeros)
        q = float8_e4m3fn(clamp(W / s, -448, 448))          round to nearest, ties to even

    ``s`` has shape [] as in FP8 checkpoints; ``q`` keeps ``weight``'s shape. Computed in float32 on ``weight``'s
    device (the quantizer of :mod:`rlcore.kernels.fp8_linear`, per tensor).
    """
    if not weight.is_floating_point() or weight.dtype == FP8_DTYPE:
        raise ValueError(f"quantize_per_tensor expects a 16- or 32-bit floating-point weight, got {weight.dtype}")
    q, scale = quantize_fp8_reference(weight, "tensor")
    return q, scale.reshape(()).to(torch.float32)


# ------------------------------------------------------------------ writing a checkpoint
def write_fp8_checkpoint(source_dir: str, target_dir: str, *, progress: bool = True) -> str:
    """Writes ``target_dir``: the 16-bit Llama checkpoint ``source_dir`` with its decoder projections quantized
    per tensor (:func:`quantize_per_tensor`); returns ``target_dir``.

    One output shard per source shard, same names (an index file rewritten to match); tensors are read one at a
    time, so memory holds one source shard's quantized output at most. config.json gains
    :data:`QUANTIZATION_CONFIG`; every other non-weight file (tokenizer, generation config) is copied. The
    directory is written under a temporary name beside ``target_dir`` and renamed at the end: a crash or a full
    disk leaves no directory that looks like a finished checkpoint.

    Raises :class:`ModelLoadError` when ``source_dir`` is not a directory, has no config.json or no
    ``*.safetensors`` weights, is already quantized, or has no Llama projection weights, and when
    ``target_dir`` exists and is not empty.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    source_dir, target_dir = os.path.abspath(os.path.expanduser(source_dir)), os.path.abspath(
        os.path.expanduser(target_dir))
    config = _source_config(source_dir)
    shards = _shards(source_dir)
    if not shards:
        raise ModelLoadError(f"source_dir={source_dir!r} holds no *.safetensors weights (other weight formats are "
                             "not read: save the model with save_pretrained(..., safe_serialization=True))")
    if os.path.exists(target_dir) and (not os.path.isdir(target_dir) or os.listdir(target_dir)):
        raise ModelLoadError(f"target_dir={target_dir!r} already exists and is not empty; give a new directory")
    parent = os.path.dirname(target_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(target_dir) + ".tmp-", dir=parent)
    try:
        weight_map: dict[str, str] = {}
        quantized = 0
        for shard in shards:
            written: dict[str, torch.Tensor] = {}
            with safe_open(os.path.join(source_dir, shard), framework="pt") as handle:
                metadata = handle.metadata() or {}
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    module = key[: -len(".weight")] if key.endswith(".weight") else None
                    if module is not None and is_quantized_projection(module):
                        if tensor.dtype == FP8_DTYPE:
                            raise ModelLoadError(f"{shard}: {key} is already {FP8_DTYPE} (a quantized checkpoint "
                                                 "without quantization_config in config.json); give the 16-bit one")
                        written[key], written[key + SCALE_SUFFIX] = quantize_per_tensor(tensor)
                        quantized += 1
                    else:
                        written[key] = tensor
                    del tensor
            save_file(written, os.path.join(staging, shard), metadata={**metadata, "format": "pt"})
            weight_map.update((key, shard) for key in written)
            if progress:
                print(f"{shard}: {sum(k.endswith(SCALE_SUFFIX) for k in written)} projections quantized to FP8",
                      flush=True)
            del written
        if not quantized:
            raise ModelLoadError(f"source_dir={source_dir!r} has no Llama projection weights (e.g. "
                                 "model.layers.0.self_attn.q_proj.weight): not a Llama-layout checkpoint")
        if os.path.isfile(os.path.join(source_dir, INDEX_NAME)):
            total = sum(os.path.getsize(os.path.join(staging, shard)) for shard in shards)
            _write_json(os.path.join(staging, INDEX_NAME), {"metadata": {"total_size": total},
                                                            "weight_map": dict(sorted(weight_map.items()))})
        _write_json(os.path.join(staging, "config.json"), {**config, "quantization_config": dict(QUANTIZATION_CONFIG)})
        for name in sorted(os.listdir(source_dir)):
            path = os.path.join(source_dir, name)
            if os.path.isfile(path) and not _NOT_COPIED.search(name):
                shutil.copy2(path, os.path.join(staging, name))
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would make the finished checkpoint private to its writer
        if os.path.isdir(target_dir):
            os.rmdir(target_dir)  # empty (checked above): the rename needs the name free
        os.rename(staging, target_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target_dir


def _source_config(source_dir: str) -> dict[str, Any]:
    if not os.path.isdir(source_dir):
        raise ModelLoadError(f"source_dir={source_dir!r} is not a directory (expected a local 16-bit Llama "
                             "checkpoint: config.json, *.safetensors, tokenizer files)")
    config_path = os.path.join(source_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ModelLoadError(f"source_dir={source_dir!r} has no config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path}: expected a JSON object")
    method = checkpoint_quantization(source_dir)
    if method is not None:
        raise ModelLoadError(f"source_dir={source_dir!r} is already quantized (config.json quantization_config."
                             f"quant_method={method!r}); give the 16-bit checkpoint")
    return config


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
        handle.write("\n")


# ------------------------------------------------------------------ reading one into a transformers model
def read_fp8_projections(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``module name → (weight [out, in] float8_e4m3fn, scale [] float32)`` of every FP8 layer of the FP8
    checkpoint ``path`` (its ``*.safetensors``), read as stored: no requantization.

    Raises :class:`ModelLoadError` for an FP8 weight without its ``weight_scale``, a scale that is not one value
    (per-channel or block scales), or a scale without an FP8 weight.
    """
    from safetensors import safe_open

    fp8_checkpoint_format(path)  # raises for formats other than per-tensor FP8 with dynamic activations
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for shard in _shards(path):
        with safe_open(os.path.join(path, shard), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".weight" + SCALE_SUFFIX):
                    scales[key[: -len(".weight" + SCALE_SUFFIX)]] = handle.get_tensor(key)
                elif key.endswith(".weight") and handle.get_slice(key).get_dtype() == "F8_E4M3":
                    weights[key[: -len(".weight")]] = handle.get_tensor(key)
    missing = sorted(set(weights) - set(scales))
    if missing:
        raise ModelLoadError(f"{path}: {missing[0]}.weight is {FP8_DTYPE} but the checkpoint has no "
                             f"{missing[0]}.weight_scale")
    orphan = sorted(set(scales) - set(weights))
    if orphan:
        raise ModelLoadError(f"{path}: {orphan[0]}.weight_scale belongs to no {FP8_DTYPE} weight")
    out = {}
    for module, weight in weights.items():
        scale = scales[module]
        if scale.numel() != 1:
            raise ModelLoadError(f"{path}: {module}.weight_scale has shape {tuple(scale.shape)}; only one scale per "
                                 "tensor is supported (per-channel and block scales are not)")
        if weight.dim() != 2:
            raise ModelLoadError(f"{path}: {module}.weight has shape {tuple(weight.shape)}; expected [out, in]")
        out[module] = (weight, scale.reshape(()).to(torch.float32))
    return out


def load_fp8_model(path: str, attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> nn.Module:
    """The transformers model of checkpoint ``path`` (on the CPU) with every decoder projection a frozen
    :class:`FP8Linear` and everything else in bf16 (the HF engine's model for ``dtype="float8"``).

    An FP8 checkpoint gives its own FP8 bytes and scales, as stored (:func:`read_fp8_projections`); transformers'
    FP8 integration is not used. A 16-bit checkpoint is loaded in bf16 and each projection quantized by
    :func:`quantize_per_tensor` from the tensor as stored when ``path`` is a local directory (the bytes
    :func:`write_fp8_checkpoint` would write), else from the loaded bf16 weight.
    """
    from transformers import AutoModelForCausalLM

    if fp8_checkpoint_format(path) is not None:
        return _load_fp8_checkpoint(path, attn_implementation, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    if os.path.isdir(path) and _shards(path):
        quantized = {key[: -len(".weight")]: quantize_per_tensor(tensor) for key, tensor in _projection_weights(path)}
    else:
        quantized = {name: quantize_per_tensor(module.weight.detach()) for name, module in model.named_modules()
                     if is_quantized_projection(name) and isinstance(module, nn.Linear)}
    _set_fp8_linears(model, quantized, path)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _load_fp8_checkpoint(path: str, attn_implementation: str, trust_remote_code: bool) -> nn.Module:
    """FP8 checkpoint ``path`` as a transformers model built on the meta device, its 16-bit tensors cast to bf16
    and assigned, its FP8 projections :class:`FP8Linear` layers over the stored bytes (nothing allocated twice)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GenerationConfig

    from rlcore.kernels import transformers_compat

    config = transformers_compat.config_without_quantization(path, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    fp8 = read_fp8_projections(path)
    _set_fp8_linears(model, fp8, path)
    state = {}
    for shard in _shards(path):
        with safe_open(os.path.join(path, shard), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".weight" + SCALE_SUFFIX) or key[: -len(".weight")] in fp8:
                    continue
                tensor = handle.get_tensor(key)
                state[key] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    expected = {name for name, value in model.state_dict().items() if value.is_meta}
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ModelLoadError(f"{path}: tensor {unexpected[0]!r} is not a parameter of {type(model).__name__}")
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # a tied lm_head is not stored: it is the input embedding again
    _rebuild_meta_buffers(model, config)
    left = [name for name, value in [*model.named_parameters(), *model.named_buffers()] if value.is_meta]
    if left:
        raise ModelLoadError(f"{path}: the checkpoint has no tensor for {left[0]!r}")
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def _rebuild_meta_buffers(model: nn.Module, config: Any) -> None:
    """Buffers a checkpoint does not store (rotary inverse frequencies) are computed again on the CPU."""
    from rlcore.kernels import transformers_compat

    for name, module in list(model.named_modules()):
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)) and name.endswith("rotary_emb"):
            parent_name, _, child = name.rpartition(".")
            fresh = transformers_compat.rebuild_rotary_embedding(module, config, torch.device("cpu"))
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def _set_fp8_linears(model: nn.Module, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str) -> None:
    """Replaces each linear module ``name`` of ``layers`` by an :class:`FP8Linear` over its (weight, scale)."""
    for name, (weight, scale) in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"{path}: FP8 weight {name}.weight has no module {name!r} in the model") from None
        if not isinstance(module, nn.Linear):
            raise ModelLoadError(f"{path}: {name} is a {type(module).__name__}, not a linear layer")
        if tuple(weight.shape) != (module.out_features, module.in_features):
            raise ModelLoadError(f"{path}: {name}.weight is {tuple(weight.shape)}, the model expects "
                                 f"{(module.out_features, module.in_features)} as [out, in]")
        if module.bias is not None:
            raise ModelLoadError(f"{path}: {name} has a bias; FP8 layers with a bias are not supported")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, FP8Linear(weight, scale))


def _shards(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))


def _projection_weights(path: str):
    """(key, tensor as stored) of every decoder projection weight of a local checkpoint, one at a time."""
    from safetensors import safe_open

    for shard in _shards(path):
        with safe_open(os.path.join(path, shard), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".weight") and is_quantized_projection(key[: -len(".weight")]):
                    yield key, handle.get_tensor(key)


# ------------------------------------------------------------------ command line
def _weight_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, shard)) for shard in _shards(directory))


def _scale_count(directory: str) -> int:
    """How many ``weight_scale`` tensors the checkpoint's shards hold, from their headers (no tensor is read)."""
    from safetensors import safe_open

    count = 0
    for shard in _shards(directory):
        with safe_open(os.path.join(directory, shard), framework="pt") as handle:
            count += sum(key.endswith(".weight" + SCALE_SUFFIX) for key in handle.keys())
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlcore.fp8_checkpoint",
        description="Quantize a local 16-bit Llama checkpoint's decoder projections to per-tensor FP8 (the "
                    "quant_method='fp8', dynamic-activation format vLLM reads); train on it with dtype='float8'.")
    parser.add_argument("source", help="local 16-bit checkpoint directory (config.json, *.safetensors, tokenizer)")
    parser.add_argument("target", help="new directory to write (must not exist, or be empty)")
    parser.add_argument("--quiet", action="store_true", help="no line per shard")
    args = parser.parse_args(argv)
    try:
        path = write_fp8_checkpoint(args.source, args.target, progress=not args.quiet)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    before, after = _weight_bytes(os.path.abspath(os.path.expanduser(args.source))), _weight_bytes(path)
    count = _scale_count(path)  # read_fp8_projections would load every FP8 weight just to count them
    print(f"wrote {path}: {count} tensors quantized to float8_e4m3fn (one float32 scale each); weights "
          f"{before / 2**20:,.1f} MiB → {after / 2**20:,.1f} MiB ({after / before:.2f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
