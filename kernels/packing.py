"""Padding-free batches: completions packed into one row, positions restarting per sample.

A packed batch is ``input_ids`` [1, T] (T = sum of real lengths), ``position_ids`` [1, T] that restart at 0
for each sample, and ``cu_seqlens`` [B+1] int32 (flash-attn's varlen convention). No pad token is computed.

Attention must not cross samples:
* ``varlen_attention`` (standalone): on CUDA with 16-bit q/k/v, PyTorch's own
  ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10), else flash-attn's ``flash_attn_varlen_func``
  when importable; otherwise SDPA with a block-diagonal causal mask (the CPU and fp32 reference).
* inside HF Llama (transformers 5.x): with ``attention_mask=None`` and packed ``position_ids``,
  ``masking_utils.create_causal_mask`` detects the restarts (``find_packed_sequence_indices``) and builds
  the block-diagonal mask for sdpa/eager (only without a KV cache: pass ``use_cache=False``); ``flash_attention_2`` reads ``cu_seq_lens_q/k`` and
  ``max_length_q/k`` kwargs (``model_kwargs`` gives them) or derives them from ``position_ids``. With
  ``rlcore.kernels.apply_kernels``, the patched attention reads the same kwargs and calls ``varlen_attention``;
  ``apply.mask_free_packed_forward`` then keeps HF from building the [T, T] block mask it would not read.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def _varlen_kernels() -> tuple[Any, Any]:
    """(torch's ``varlen_attn``, flash-attn's ``flash_attn_varlen_func``), None where unavailable. Imported on
    first use, not with this module: ``torch.nn.attention.varlen`` pulls in torch._dynamo (~1.5 s)."""
    try:  # torch >= 2.10; its kernel runs on CUDA only
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # pragma: no cover - depends on the torch version
        varlen_attn = None
    try:  # optional, CUDA only
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    except Exception:  # pragma: no cover - depends on the install
        flash_attn_varlen_func = None
    return varlen_attn, flash_attn_varlen_func


def __getattr__(name: str) -> Any:
    # ``torch_varlen_attn`` / ``flash_attn_varlen_func`` stay readable as module attributes
    if name == "torch_varlen_attn":
        return _varlen_kernels()[0]
    if name == "flash_attn_varlen_func":
        return _varlen_kernels()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_HALF = (torch.float16, torch.bfloat16)  # the dtypes the flash varlen kernels take


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    cu_seqlens: torch.Tensor  # [B + 1] int32
    max_seqlen: int
    index: torch.Tensor | None = None  # flat indices into the padded [B, L] batch, when packed from one

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def model_kwargs(self, flash: bool = False) -> dict:
        """Arguments for an HF decoder forward. ``flash=True`` adds the varlen kwargs that
        ``flash_attention_2`` consumes; sdpa/eager build their block mask from ``position_ids``."""
        # use_cache=False matters: HF only looks for packed positions when there is no KV cache
        kwargs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": None,
                  "use_cache": False}
        if flash:
            kwargs.update(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                          max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)
        return kwargs


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _positions(lengths: torch.Tensor) -> torch.Tensor:
    total = int(lengths.sum())
    starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return torch.arange(total, device=lengths.device) - starts


def pack_sequences(sequences: list[torch.Tensor]) -> PackedBatch:
    """Packs 1-D token tensors end to end."""
    if not sequences:
        raise ValueError("pack_sequences needs at least one sequence")
    if any(s.dim() != 1 or s.numel() == 0 for s in sequences):
        raise ValueError("every sequence must be a non-empty 1-D tensor")
    lengths = torch.tensor([s.numel() for s in sequences], device=sequences[0].device)
    return PackedBatch(torch.cat(sequences).unsqueeze(0), _positions(lengths).unsqueeze(0), _cu_seqlens(lengths),
                       int(lengths.max()))


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedBatch:
    """Packs a padded [B, L] batch (left- and/or right-padded; real tokens contiguous per row)."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and attention_mask must both be [B, L]; got {tuple(input_ids.shape)}, "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    if (lengths == 0).any():
        raise ValueError("a row of the batch has no real token")
    index = mask.reshape(-1).nonzero().squeeze(1)
    return PackedBatch(input_ids.reshape(-1)[index].unsqueeze(0), _positions(lengths).unsqueeze(0),
                       _cu_seqlens(lengths), int(lengths.max()), index)


def unpack(values: torch.Tensor, packed: PackedBatch, shape: tuple[int, int], fill: float = 0.0) -> torch.Tensor:
    """Scatters per-token ``values`` [T, ...] or [1, T, ...] back to a padded [B, L, ...] tensor."""
    if packed.index is None:
        raise ValueError("unpack needs a PackedBatch made by pack_padded (it records where tokens came from)")
    if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == packed.index.numel():
        values = values[0]
    out = values.new_full((shape[0] * shape[1], *values.shape[1:]), fill)
    out = out.index_copy(0, packed.index, values)  # out of place: differentiable w.r.t. values
    return out.view(shape[0], shape[1], *values.shape[1:])


def packed_positions(packed: PackedBatch, select: torch.Tensor) -> torch.Tensor:
    """Where in the packed row the tokens that ``select`` marks sit, in row-major order of ``select``.

    ``select`` is a [B, L] boolean over the padded batch ``packed`` was made from by :func:`pack_padded`; it
    may mark only real (packed) tokens.
    """
    if packed.index is None:
        raise ValueError("packed_positions needs a PackedBatch made by pack_padded (it records where tokens came "
                         "from)")
    slot = torch.full((select.numel(),), -1, dtype=torch.long, device=packed.index.device)
    slot[packed.index] = torch.arange(packed.index.numel(), device=packed.index.device)
    where = slot[select.reshape(-1).to(slot.device)]
    if (where < 0).any():
        raise ValueError("select marks padding positions, which pack_padded left out")
    return where


def block_diagonal_causal_mask(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Boolean [T, T] mask, True where query i may attend key j (same sample, j <= i)."""
    lengths = cu_seqlens.diff().long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    t = seq.numel() if total is None else total
    pos = torch.arange(t, device=cu_seqlens.device)
    return (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hk, D] → [T, Hq, D] with SDPA under a block-diagonal causal mask."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # GQA: each kv head serves `groups` query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    mask = block_diagonal_causal_mask(cu_seqlens, q.shape[0])
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


@functools.lru_cache(maxsize=None)
def _torch_varlen_params() -> frozenset[str]:
    torch_varlen_attn = _varlen_kernels()[0]
    return frozenset(inspect.signature(torch_varlen_attn).parameters) if torch_varlen_attn is not None else frozenset()


def varlen_backend(q: torch.Tensor, scale: float | None = None, backend: str | None = None) -> str:
    """Which implementation :func:`varlen_attention` uses for these inputs: ``"torch_varlen"``,
    ``"flash_attn"`` or ``"reference"``."""
    if backend == "torch" or not q.is_cuda or q.dtype not in _HALF:
        return "reference"
    params = _torch_varlen_params()
    # torch 2.10 spells causal ``is_causal=True``; later versions ``window_size=(-1, 0)``
    causal = "window_size" in params or "is_causal" in params
    default_scale = scale is None or abs(scale - q.shape[-1] ** -0.5) < 1e-12
    torch_varlen_attn, flash_attn_varlen_func = _varlen_kernels()
    if torch_varlen_attn is not None and causal and ("scale" in params or default_scale):
        return "torch_varlen"
    if flash_attn_varlen_func is not None:
        return "flash_attn"
    return "reference"


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Causal attention within each packed sample; q [T, Hq, D], k/v [T, Hk, D] → [T, Hq, D].

    On CUDA with 16-bit inputs: torch's ``varlen_attn`` when this torch has it, else flash-attn's varlen
    kernel if installed; otherwise (CPU, fp32, ``backend="torch"``) SDPA under a block-diagonal causal mask.
    """
    choice = varlen_backend(q, scale, backend)
    if choice == "torch_varlen":
        params = _torch_varlen_params()
        kwargs: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if scale is not None and "scale" in params:
            kwargs["scale"] = scale
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                kwargs["enable_gqa"] = True
            else:  # GQA by hand: each kv head serves q_heads / kv_heads query heads
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return _varlen_kernels()[0](q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)
    if choice == "flash_attn":
        return _varlen_kernels()[1](q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      softmax_scale=scale, causal=True)
    return varlen_attention_reference(q, k, v, cu_seqlens, scale)
