"""Every private or undocumented vLLM access rlcore makes, in one place, written against vllm 0.26.0.

rlcore runs vLLM in its own process and reaches into it where no public API exists: to share the weights
with the trainer, to write trained LoRA weights into vLLM's GPU slots, and to release only the KV cache
between generation and training. Each function below says which vLLM internal it touches. A vLLM other than
:data:`TESTED_VERSION` is refused when vLLM is first imported through :func:`import_vllm` (set
``RLCORE_ALLOW_UNTESTED_VLLM=1`` to go on with a warning): these internals change between releases, and a
changed LoRA layout would silently train one model and sample from another.

Nothing here imports vLLM at module import: vLLM is optional (GPU machines only) and slow to import.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

TESTED_VERSION = "0.26.0"
ALLOW_UNTESTED_ENV = "RLCORE_ALLOW_UNTESTED_VLLM"
# vllm/config/lora.py (0.26.0): the LoRA slot ranks vLLM accepts for max_lora_rank.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's Llama fuses these projections (LlamaForCausalLM.packed_modules_mapping, 0.26.0).
DEFAULT_PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
KV_CACHE_TAG = "kv_cache"  # CuMemAllocator tag of the KV cache under enable_sleep_mode (0.26.0)


class VLLMVersionError(RuntimeError):
    """The installed vLLM is not the version rlcore's vLLM internals were written against."""


def check_version(version: str, allow_untested: bool | None = None) -> None:
    """Raises :class:`VLLMVersionError` unless ``version`` is :data:`TESTED_VERSION` (local build tags such as
    ``+cu130`` ignored); with ``allow_untested`` (default: ``$RLCORE_ALLOW_UNTESTED_VLLM`` set) warns instead."""
    release = version.split("+")[0]
    if release == TESTED_VERSION:
        return
    if allow_untested is None:
        allow_untested = os.environ.get(ALLOW_UNTESTED_ENV, "") not in ("", "0")
    message = (f"vllm {version} is installed, but rlcore's vLLM integration (rlcore/vllm_compat.py: shared "
               f"weights, in-place LoRA slots, KV-cache standby) was written and tested against vllm "
               f"{TESTED_VERSION}. Install it (pip install 'rlcore[vllm]'), use engine='hf', or set "
               f"{ALLOW_UNTESTED_ENV}=1 to try this version anyway.")
    if not allow_untested:
        raise VLLMVersionError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


_checked = False


def import_vllm() -> Any:
    """``import vllm`` with the version check above (once per process)."""
    global _checked
    import vllm

    if not _checked:
        check_version(getattr(vllm, "__version__", "unknown"))
        _checked = True
    return vllm


def keep_engine_in_process() -> None:
    """vLLM's engine core must run in this process for its tensors to be shared (read when the LLM is built).

    ``VLLM_ENABLE_V1_MULTIPROCESSING`` is a documented environment variable; the in-process layout it gives
    (the model object reachable from ``LLM``) is what the rest of this module relies on.
    """
    if os.environ.get(IN_PROCESS_ENV, "0") != "0":
        raise RuntimeError("VLLMEngine shares vLLM's weights with the trainer, so vLLM must run in this "
                           f"process: unset {IN_PROCESS_ENV} or set it to 0")
    os.environ[IN_PROCESS_ENV] = "0"


# ------------------------------------------------------------------ engine objects
def live_model(llm: Any) -> nn.Module:
    """vLLM's live model (LoRA-wrapped layers included): ``LLM.apply_model`` with the identity returns the
    object itself only when the engine runs in this process (0.26.0)."""
    return llm.apply_model(lambda model: model)[0]


def driver_worker(llm: Any) -> Any:
    """The in-process GPU worker: ``collective_rpc`` with a callable runs it with the worker wrapper as
    ``self`` (0.26.0); the wrapper's ``.worker`` is the GPU worker."""
    wrapper = llm.collective_rpc(lambda self: self)[0]
    return getattr(wrapper, "worker", wrapper)


def hf_config(llm: Any) -> Any:
    """The transformers config of the served checkpoint (``llm.llm_engine.model_config.hf_config``)."""
    return llm.llm_engine.model_config.hf_config


def kv_cache_tokens(llm: Any, worker: Any) -> int | None:
    """Tokens of KV cache vLLM allocated: ``cache_config.num_gpu_blocks × block_size`` of the engine's (or the
    worker's) ``vllm_config``; None when neither says."""
    for config in (getattr(llm.llm_engine, "vllm_config", None), getattr(worker, "vllm_config", None)):
        cache = getattr(config, "cache_config", None)
        if cache is not None and cache.num_gpu_blocks:
            return int(cache.num_gpu_blocks) * int(cache.block_size)
    return None


def packed_modules(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """vLLM's fused module → the transformers modules whose rows it stacks (``packed_modules_mapping``)."""
    packed = getattr(model, "packed_modules_mapping", None) or DEFAULT_PACKED_MODULES
    return {name: tuple(parts) for name, parts in packed.items()}


# ------------------------------------------------------------------ weights
def unwrapped_parameter_name(name: str) -> str:
    """A vLLM parameter name without the LoRA wrapper's ``.base_layer.`` (vLLM's LoRA layers wrap the base
    layer as ``base_layer``, 0.26.0): ``model.layers.0.self_attn.qkv_proj.base_layer.weight`` →
    ``model.layers.0.self_attn.qkv_proj.weight``."""
    return name.replace(".base_layer.", ".")


def unpadded_vocab_rows(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The real rows of a vocabulary-sized tensor (``embed_tokens`` / ``lm_head``).

    vLLM pads the vocabulary dimension (``VocabParallelEmbedding``: to a multiple of 64, plus LoRA extra
    vocabulary slots); the first rows are the real ones, so a leading row slice, still a view, is the weight
    transformers expects. Other tensors are returned unchanged.
    """
    if (tensor.shape != shape and tensor.dim() == len(shape) and tensor.shape[1:] == shape[1:]
            and tensor.shape[0] >= shape[0]):
        return tensor[: shape[0]]
    return tensor


# ------------------------------------------------------------------ FP8 weights (quantization="fp8")
FP8_WEIGHT_DTYPE = torch.float8_e4m3fn  # vLLM's FP8 weight type on NVIDIA GPUs


def fp8_weight_and_scale(sources: dict[str, torch.Tensor], module_name: str
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """vLLM linear layer ``module_name``'s FP8 weight as [out, in] and its float32 scale; None when the layer
    is not FP8. ``sources``: vLLM's parameter name → tensor, LoRA wrappers' ``.base_layer.`` removed.

    With ``quantization="fp8"`` on a 16-bit checkpoint, ``Fp8PerTensorOnlineLinearMethod``'s
    ``process_weights_after_loading`` (``model_executor/layers/quantization/online/fp8.py``, 0.26.0) replaces
    ``weight`` by ``qweight.t()`` — an [in, out] view over row-major [out, in] ``float8_e4m3fn`` bytes — and
    ``weight_scale`` by the one float32 scale ``ops.scaled_fp8_quant`` computed for the whole (fused) layer,
    shape [1]. The [out, in] tensor returned is that view transposed back (no copy). Anything else raises
    ``ValueError`` rather than be read in a wrong orientation: an FP8 weight stored another way, a missing
    scale, block-quantized layers (``weight_scale_inv``).
    """
    weight = sources.get(f"{module_name}.weight")
    if weight is None or weight.dtype != FP8_WEIGHT_DTYPE:
        return None
    if f"{module_name}.weight_scale_inv" in sources:
        raise ValueError(f"{module_name}: block-quantized FP8 weights (weight_scale_inv) are not supported; use a "
                         "16-bit checkpoint with dtype='float8' (vLLM quantizes it per tensor)")
    scale = sources.get(f"{module_name}.weight_scale")
    if scale is None:
        raise ValueError(f"{module_name}.weight is {weight.dtype} but vLLM holds no {module_name}.weight_scale")
    if weight.dim() != 2 or not weight.t().is_contiguous():
        raise ValueError(f"{module_name}.weight: an FP8 tensor of shape {tuple(weight.shape)} and strides "
                         f"{weight.stride()} is not vLLM {TESTED_VERSION}'s [in, out] view of row-major [out, in] "
                         "bytes")
    return weight.t(), scale


# ------------------------------------------------------------------ LoRA slots
def lora_wrapped_layers(model: nn.Module) -> Iterator[tuple[str, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """(module name, A slices, B slices) of every LoRA-wrapped linear layer of vLLM's model.

    After one adapter has been added, each wrapped layer holds ``lora_a_stacked`` / ``lora_b_stacked``: a tuple
    with one tensor per fused part (qkv: 3, gate_up: 2, others: 1), A of shape ``[max_loras, 1, r, in]`` and B
    of ``[max_loras, 1, out, r]`` (0.26.0). Embedding / logits wrappers hold one tensor, not a tuple: skipped.
    """
    for name, module in model.named_modules():
        if not hasattr(module, "lora_a_stacked"):
            continue
        a_slices, b_slices = module.lora_a_stacked, module.lora_b_stacked
        if not isinstance(a_slices, (tuple, list)):
            continue
        yield name, tuple(a_slices), tuple(b_slices)


def clear_lora_slot(a_slices: tuple[torch.Tensor, ...], b_slices: tuple[torch.Tensor, ...], slot: int) -> None:
    """Zeros one slot of every part (a stale adapter must not leak into parts the policy does not target).

    The slot tensors may be inference tensors (allocated under ``inference_mode``): writing them needs it too.
    """
    with torch.inference_mode():
        for a_slice, b_slice in zip(a_slices, b_slices):
            a_slice[slot].zero_()
            b_slice[slot].zero_()


def lora_slot_views(a_slice: torch.Tensor, b_slice: torch.Tensor, slot: int, lora_a_shape: torch.Size,
                    lora_b_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """The views of one slot that hold a PEFT ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]``.

    A smaller policy rank than the slot's fills the leading rows of A and columns of B; the rest stays zero.
    Raises ``ValueError`` when the input/output sizes do not match the slot.
    """
    if lora_a_shape[1] != a_slice.shape[-1] or lora_b_shape[0] != b_slice.shape[-2]:
        raise ValueError(f"PEFT A {tuple(lora_a_shape)} / B {tuple(lora_b_shape)} do not fit vLLM's LoRA slots "
                         f"{tuple(a_slice.shape)} / {tuple(b_slice.shape)}")
    return (a_slice[slot, 0, : lora_a_shape[0], : lora_a_shape[1]],
            b_slice[slot, 0, : lora_b_shape[0], : lora_b_shape[1]])


def lora_b_slot_scale(peft_scaling: float) -> float:
    """The factor B is stored with: vLLM folds the adapter's ``lora_alpha / r`` into B when it loads an adapter
    (0.26.0) and applies no scaling at run time, so B is copied times PEFT's ``scaling``."""
    return float(peft_scaling)


def _lora_manager(worker: Any) -> Any:
    manager = getattr(worker.model_runner, "lora_manager", None)
    if manager is None:
        raise RuntimeError("vLLM was started without enable_lora")
    return manager


def register_pinned_adapter(worker: Any, request: Any, rank: int) -> None:
    """Adds a zero LoRA of ``rank`` under ``request``'s id from memory and pins it in a GPU slot.

    ``worker.model_runner.lora_manager``: ``list_adapters``, ``add_dummy_lora`` and ``pin_adapter`` (0.26.0).
    A request carrying this id then finds the adapter loaded and never reads ``lora_path``; pinning keeps it
    from being evicted, which would reload the zero weights over the synced ones.
    """
    manager = _lora_manager(worker)
    if request.lora_int_id not in manager.list_adapters():
        manager.add_dummy_lora(request, rank=rank)
    manager.pin_adapter(request.lora_int_id)


def lora_slot_index(worker: Any, lora_id: int) -> int:
    """The GPU slot holding adapter ``lora_id``: its position in the private
    ``lora_manager._adapter_manager.lora_index_to_id`` (0.26.0)."""
    adapter_manager = _lora_manager(worker)._adapter_manager
    return list(adapter_manager.lora_index_to_id).index(lora_id)


# ------------------------------------------------------------------ standby (KV cache only)
def _kv_allocations(asleep: bool) -> list[Any]:
    """``CuMemAllocator.pointer_to_data`` entries tagged "kv_cache" whose ``is_asleep`` is ``asleep`` (0.26.0:
    ``AllocationData(handle, tag, cpu_backup_tensor, is_asleep)``, handle = (device, size, pointer, cumem
    handle))."""
    from vllm.device_allocator.cumem import CuMemAllocator

    allocator = CuMemAllocator.get_instance()
    return [data for data in allocator.pointer_to_data.values()
            if data.tag == KV_CACHE_TAG and bool(data.is_asleep) == asleep]


def release_kv_cache() -> int:
    """Unmaps every live KV-cache allocation of vLLM's ``CuMemAllocator`` in one pass; returns the bytes released.

    No public vLLM API releases the KV cache alone (``LLM.sleep(level=1)`` also copies the weights to CPU,
    level 2 discards them, and the trainer is reading them). For each "kv_cache" handle this calls
    ``vllm.device_allocator.cumem.unmap_and_release`` and marks its ``AllocationData`` asleep, as
    ``CuMemAllocator.sleep`` does for a discarded tag (0.26.0). The caller resets the prefix cache first and
    makes sure no kernel still reads the cache.

    Neither ``gc.collect()`` nor ``torch.cuda.empty_cache()`` follows (``CuMemAllocator.sleep`` does both): the
    KV tensors stay allocated in PyTorch's view, so releasing them puts nothing in PyTorch's cache, and a full
    collection of the process's Python objects costs tens of milliseconds for no memory.
    """
    from vllm.device_allocator.cumem import unmap_and_release

    released = 0
    for data in _kv_allocations(asleep=False):
        unmap_and_release(data.handle)
        data.is_asleep = True
        released += data.handle[1]
    if not released:
        raise RuntimeError("no KV-cache allocation found in vLLM's CuMemAllocator (was enable_sleep_mode set?)")
    return released


def released_kv_cache_bytes() -> int:
    """Bytes of KV cache that :func:`release_kv_cache` released and :func:`map_kv_cache` has not mapped back."""
    return sum(data.handle[1] for data in _kv_allocations(asleep=True))


def map_kv_cache(worker: Any) -> int:
    """Maps back every KV-cache allocation :func:`release_kv_cache` released; returns the bytes mapped.

    What ``CuMemAllocator.wake_up(tags=["kv_cache"])`` does for allocations without a CPU backup (0.26.0):
    ``vllm.device_allocator.cumem.create_and_map(handle)`` and ``is_asleep = False``, at the same virtual
    addresses, so the KV tensors and captured CUDA graphs stay valid; then, as :func:`wake_kv_cache`,
    ``worker.model_runner.post_kv_cache_wake_up()`` (resets FP8 KV-cache scales; a no-op for 16-bit caches).
    Without the collection and cache emptying that newer ``wake_up`` starts with: the caller hands PyTorch's
    cached blocks back only when the device lacks room. A failed mapping (out of memory) raises
    ``RuntimeError`` from vLLM's extension; the allocations mapped before it stay mapped and marked awake, so
    calling again maps the rest.
    """
    from vllm.device_allocator.cumem import create_and_map

    mapped = 0
    for data in _kv_allocations(asleep=True):
        create_and_map(data.handle)
        data.is_asleep = False
        mapped += data.handle[1]
    worker.model_runner.post_kv_cache_wake_up()
    return mapped


def wake_kv_cache(worker: Any) -> None:
    """vLLM's own re-mapping: ``CuMemAllocator.wake_up(tags=["kv_cache"])`` (public on the allocator), then
    ``worker.model_runner.post_kv_cache_wake_up()``. Kept as the reference :func:`map_kv_cache` is measured
    against (it may start with a garbage collection and a cache emptying of its own, depending on the release)."""
    from vllm.device_allocator.cumem import CuMemAllocator

    CuMemAllocator.get_instance().wake_up(tags=[KV_CACHE_TAG])
    worker.model_runner.post_kv_cache_wake_up()


# ------------------------------------------------------------------ outputs
def sampled_logprobs(logprobs: Any, tokens: list[int]) -> list[float]:
    """The sampled token's logprob at each position (vLLM always includes it, whatever its rank).

    With ``SamplingParams(flat_logprobs=True)`` vLLM returns a ``FlatLogprobs``: per position ``start_indices``
    / ``end_indices`` into flat ``token_ids`` / ``logprobs`` columns (lists in 0.26.0; numpy arrays in later
    releases, hence no list methods here); otherwise a list of ``{token_id: Logprob}`` dicts.
    """
    if logprobs is None:
        raise RuntimeError("vLLM returned no logprobs (SamplingParams.logprobs=0 was expected)")
    if getattr(logprobs, "start_indices", None) is not None:
        out = []
        for position, token in enumerate(tokens):
            begin, end = int(logprobs.start_indices[position]), int(logprobs.end_indices[position])
            offset = next((i for i, t in enumerate(logprobs.token_ids[begin:end]) if int(t) == token), None)
            if offset is None:
                raise RuntimeError(f"vLLM reported no logprob for the sampled token {token} at position {position}")
            out.append(float(logprobs.logprobs[begin + offset]))
        return out
    return [float(step[token].logprob) for step, token in zip(logprobs, tokens)]
