"""A transformers model whose frozen weights are views of another module's tensors (vLLM's live model).

vLLM fuses projections: ``qkv_proj`` holds the rows of q, k and v, ``gate_up_proj`` the rows of gate and up.
:func:`build_shared_model` builds the transformers model on the meta device (no memory) and then sets every
parameter to a view of the matching vLLM tensor: q/k/v are row slices of ``qkv_proj.weight``, gate/up row
slices of ``gate_up_proj.weight``, everything else (o, down, embeddings, lm_head, norms) the tensor itself.
Nothing is copied, so the trainer's forward pass reads the exact bytes vLLM generates with.

Only the naming scheme of Llama-family decoders is mapped (Llama, Mistral, Qwen2/3: ``model.layers.N.self_attn``
/ ``mlp``); an unknown parameter raises ``ValueError`` naming it. vLLM's layout facts come from
:mod:`rlcore.vllm_compat`, torch's and transformers' internals from :mod:`rlcore.kernels.torch_compat` and
:mod:`rlcore.kernels.transformers_compat`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from rlcore import vllm_compat
from rlcore.fp8_weights import share_fp8_linears
from rlcore.kernels import torch_compat, transformers_compat

# vLLM's fused module -> the transformers modules whose output rows it stacks, in order.
DEFAULT_PACKED_MODULES = vllm_compat.DEFAULT_PACKED_MODULES

# A normal (non-inference, grad-free) tensor over the same memory: vLLM's weights may be inference tensors,
# which autograd refuses to save for backward even as frozen weights.
alias_tensor = torch_compat.normal_tensor_alias


def source_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """``name -> tensor`` of a vLLM model, with the LoRA wrappers' ``.base_layer`` removed from the names."""
    out: dict[str, torch.Tensor] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        out[vllm_compat.unwrapped_parameter_name(name)] = parameter
    return out


def _head_sizes(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim, kv_heads * head_dim


def _view_for(name: str, shape: torch.Size, sources: dict[str, torch.Tensor], config,
              packed: dict[str, tuple[str, ...]]) -> torch.Tensor:
    """The slice of a vLLM tensor that plays the role of transformers parameter ``name`` (shape ``shape``)."""
    if name in sources:
        return vllm_compat.unpadded_vocab_rows(alias_tensor(sources[name]), shape)
    module_path, _, leaf = name.rpartition(".")
    parent, _, module_name = module_path.rpartition(".")
    for fused, parts in packed.items():
        if module_name not in parts:
            continue
        fused_name = f"{parent}.{fused}.{leaf}"
        if fused_name not in sources:
            continue
        fused_tensor = alias_tensor(sources[fused_name])
        if fused == "qkv_proj" and len(parts) == 3:
            q_size, kv_size = _head_sizes(config)
            sizes = (q_size, kv_size, kv_size)
        else:
            # equal parts (gate/up: intermediate_size each)
            sizes = (fused_tensor.shape[0] // len(parts),) * len(parts)
        if sum(sizes) != fused_tensor.shape[0]:
            raise ValueError(f"{fused_name} has {fused_tensor.shape[0]} rows, expected {sum(sizes)} "
                             f"({' + '.join(map(str, sizes))} for {', '.join(parts)})")
        index = parts.index(module_name)
        start = sum(sizes[:index])
        return fused_tensor[start: start + sizes[index]]
    raise ValueError(f"no vLLM tensor for transformers parameter {name!r}; shared weights support "
                     "Llama-family decoders (fused qkv_proj / gate_up_proj)")


def _restore_buffers(model: nn.Module, config, device: torch.device) -> None:
    """Buffers created on the meta device (rotary inverse frequencies) are recomputed on ``device``."""
    for module_name, module in list(model.named_modules()):
        meta_buffers = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta_buffers:
            continue
        if module_name.endswith("rotary_emb"):
            fresh = transformers_compat.rebuild_rotary_embedding(module, config, device)
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, fresh)
        else:
            raise ValueError(f"module {module_name!r} has buffers {meta_buffers} that can not be rebuilt")


def build_shared_model(source_model: nn.Module, config, dtype: torch.dtype | None = None,
                       packed: dict[str, Iterable[str]] | None = None,
                       attn_implementation: str = "sdpa") -> nn.Module:
    """A transformers causal LM whose every parameter is a frozen view of ``source_model``'s tensors.

    ``config`` is the transformers config of the checkpoint; ``packed`` maps fused module names to the modules
    they stack (default: vLLM's Llama mapping). The result has ``requires_grad=False`` everywhere and allocates
    no parameter memory of its own.
    """
    from transformers import AutoModelForCausalLM

    packed_map = {k: tuple(v) for k, v in (packed or DEFAULT_PACKED_MODULES).items()}
    sources = source_parameters(source_model)
    if not sources:
        raise ValueError("the source model has no parameters")
    first = next(iter(sources.values()))
    device = first.device
    dtype = dtype or first.dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    # FP8 projections (dtype="float8"): FP8Linear layers over views of vLLM's FP8 weights and scales
    share_fp8_linears(model, sources, config, packed_map)
    shared: dict[int, nn.Parameter] = {}
    for name, parameter in list(model.named_parameters(remove_duplicate=False)):
        if not parameter.is_meta:
            continue  # already a view of vLLM's tensors (the FP8 layers above)
        module_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(module_path) if module_path else model
        key = id(parameter)  # tied weights (one meta parameter under two names) stay one parameter
        if key not in shared:
            view = _view_for(name, parameter.shape, sources, config, packed_map)
            if view.shape != parameter.shape:
                raise ValueError(f"{name}: vLLM tensor has shape {tuple(view.shape)}, transformers expects "
                                 f"{tuple(parameter.shape)}")
            if view.dtype != dtype:
                raise ValueError(f"{name}: vLLM tensor is {view.dtype}, expected {dtype} (quantised weights "
                                 "are not shared by this builder)")
            shared[key] = nn.Parameter(view, requires_grad=False)
        torch_compat.replace_parameter(owner, leaf, shared[key])
    _restore_buffers(model, config, device)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"parameters left on the meta device: {leftover[:5]}")
    model.eval()
    return model


def shared_fraction(model: nn.Module, source_model: nn.Module) -> tuple[int, int]:
    """(parameters of ``model`` whose storage is one of ``source_model``'s, all parameters of ``model``)."""
    storages = {p.untyped_storage().data_ptr() for p in source_model.parameters()}
    params = list(model.parameters())
    return sum(p.untyped_storage().data_ptr() in storages for p in params), len(params)
