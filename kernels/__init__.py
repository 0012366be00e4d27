"""Triton kernels for the training phase, each beside its pure-PyTorch reference.

Every op dispatches to Triton on CUDA and to the reference elsewhere; ``RLCORE_KERNELS=triton|torch`` (or a
``backend=`` argument) forces one side. Submodules import lazily-compiled kernels, so importing this
package does not need a GPU or Triton.
"""

from .apply import apply_kernels, revert_kernels
from .lora_linear import lora_linear, lora_linear_reference
from .offload import offload_activations, release_host_cache
from .recompute import plan_checkpointing, saved_bytes_per_layer, set_checkpointed_layers
from .packing import PackedBatch, pack_padded, pack_sequences, unpack, varlen_attention
from .rmsnorm import rmsnorm, rmsnorm_reference
from .rope import apply_rope_, rope_cos_sin, rope_reference
from .selective_logprobs import auto_chunk_size, selective_log_softmax, selective_log_softmax_naive
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "PackedBatch", "apply_kernels", "apply_rope_", "auto_chunk_size", "lora_linear", "lora_linear_reference",
    "offload_activations", "pack_padded", "plan_checkpointing", "release_host_cache", "saved_bytes_per_layer",
    "set_checkpointed_layers", "pack_sequences", "revert_kernels", "rmsnorm", "rmsnorm_reference",
    "rope_cos_sin", "rope_reference", "selective_log_softmax", "selective_log_softmax_naive", "swiglu",
    "swiglu_reference", "unpack", "varlen_attention",
]
