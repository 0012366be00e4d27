"""Rotary position embedding on q and k together, in place, with arbitrary (packed) positions.

Layout is HF's: q [B, Hq, L, D], k [B, Hk, L, D] (any strides, last dim contiguous), cos/sin either
[B or 1, L, D] rows per token (what ``LlamaRotaryEmbedding`` returns for ``position_ids``) or, with
``position_ids`` [B, L], tables [P, D] looked up per token: packed sequences whose positions restart at 0
for every sample just pass those position ids. cos/sin are taken to repeat their first half in the second
(``cat(freqs, freqs)``), which holds for Llama's default and llama3-scaled RoPE.

``x' = x·cos + rotate_half(x)·sin``; the backward is the inverse rotation (sin negated), read from the incoming
gradient and written to a new buffer in one pass, so nothing but cos/sin (and position ids) is saved.
"""

import torch

from ._utils import lazy_jit, needs_int64, next_power_of_2, resolve_backend, tl


@lazy_jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr,
                 sqb, sqh, sql, skb, skh, skl, scb, scl, spb, spl,
                 L, HQ, HK, HALF, SIGN,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
                 USE_POS: tl.constexpr, I64: tl.constexpr):
    tok = tl.program_id(0)
    if I64:
        tok = tok.to(tl.int64)
    b = tok // L
    l_idx = tok % L
    if USE_POS:
        pos = tl.load(pos_ptr + b * spb + l_idx * spl)
        c_off = pos * scl
    else:
        c_off = b * scb + l_idx * scl
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    c = tl.load(cos_ptr + c_off + d, mask=dmask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + c_off + d, mask=dmask, other=0.0).to(tl.float32) * SIGN

    hq = tl.arange(0, BLOCK_HQ)
    qmask = (hq[:, None] < HQ) & dmask[None, :]
    q_off = b * sqb + l_idx * sql + hq[:, None] * sqh + d[None, :]
    q1 = tl.load(q_ptr + q_off, mask=qmask, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + q_off + HALF, mask=qmask, other=0.0).to(tl.float32)
    tl.store(qo_ptr + q_off, (q1 * c - q2 * s).to(qo_ptr.dtype.element_ty), mask=qmask)
    tl.store(qo_ptr + q_off + HALF, (q2 * c + q1 * s).to(qo_ptr.dtype.element_ty), mask=qmask)

    hk = tl.arange(0, BLOCK_HK)
    kmask = (hk[:, None] < HK) & dmask[None, :]
    k_off = b * skb + l_idx * skl + hk[:, None] * skh + d[None, :]
    k1 = tl.load(k_ptr + k_off, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + k_off + HALF, mask=kmask, other=0.0).to(tl.float32)
    tl.store(ko_ptr + k_off, (k1 * c - k2 * s).to(ko_ptr.dtype.element_ty), mask=kmask)
    tl.store(ko_ptr + k_off + HALF, (k2 * c + k1 * s).to(ko_ptr.dtype.element_ty), mask=kmask)


def _bhld(x: torch.Tensor, head_dim: int | None) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    """(B, H, L, D) sizes and (b, h, l) strides of a [B, H, L, D] tensor or a [B, L, H·D] one."""
    if x.dim() == 4:
        return (x.shape[0], x.shape[1], x.shape[2], x.shape[3]), (x.stride(0), x.stride(1), x.stride(2))
    heads = x.shape[2] // head_dim
    return (x.shape[0], heads, x.shape[1], head_dim), (x.stride(0), head_dim * x.stride(2), x.stride(1))


def _launch(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, position_ids: torch.Tensor | None, head_dim: int | None, sign: float) -> None:
    (bsz, hq, length, dim), (sqb, sqh, sql) = _bhld(q, head_dim)
    (_, hk, _, _), (skb, skh, skl) = _bhld(k, head_dim)
    if position_ids is not None:
        pos = position_ids.expand(bsz, length)
        scb, scl = 0, cos.stride(0)
        spb, spl = pos.stride(0), pos.stride(1)
    else:
        pos = cos  # unused by the kernel
        scb = cos.stride(0) if cos.shape[0] > 1 else 0
        scl = cos.stride(1)
        spb = spl = 0
    if bsz * length == 0:
        return
    _rope_kernel[(bsz * length,)](
        q, k, q_out, k_out, cos, sin, pos, sqb, sqh, sql, skb, skh, skl,
        scb, scl, spb, spl, length, hq, hk, dim // 2, sign,
        BLOCK_HQ=next_power_of_2(hq), BLOCK_HK=next_power_of_2(hk), BLOCK_D=next_power_of_2(dim // 2),
        USE_POS=position_ids is not None, I64=needs_int64(q, k, cos), num_warps=4)


class _RopeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None, head_dim: int | None, inplace: bool):
        if inplace:
            q_out, k_out = q, k
        else:
            # empty_like keeps the strides of dense views (e.g. HF's transposed q), so one stride set serves
            q_out, k_out = torch.empty_like(q), torch.empty_like(k)
            if q_out.stride() != q.stride() or k_out.stride() != k.stride():
                q_out = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device)
                k_out = torch.empty_strided(k.shape, k.stride(), dtype=k.dtype, device=k.device)
        _launch(q, k, q_out, k_out, cos, sin, position_ids, head_dim, 1.0)
        if inplace:
            ctx.mark_dirty(q, k)
        ctx.head_dim = head_dim
        ctx.save_for_backward(cos, sin, position_ids)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin, position_ids = ctx.saved_tensors
        (dq, dq_out), (dk, dk_out) = _source_and_target(dq), _source_and_target(dk)
        _launch(dq, dk, dq_out, dk_out, cos, sin, position_ids, ctx.head_dim, -1.0)
        return dq_out, dk_out, None, None, None, None, None


def _source_and_target(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the backward rotation reads and writes: a fresh buffer, never the incoming gradient (autograd
    may hand the same buffer elsewhere), but one pass only: read ``grad``, write the target. If making it
    contiguous already copied, that copy is ours and is rotated in place."""
    dense = grad.contiguous()
    if dense.data_ptr() != grad.data_ptr():
        return dense, dense
    return dense, torch.empty_like(dense)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``apply_rotary_pos_emb`` (out of place); with ``position_ids`` cos/sin are [P, D] tables."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, L, D] for ``position_ids`` [B, L], as ``LlamaRotaryEmbedding`` computes them."""
    freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None = None, head_dim: int | None = None,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k (one fused launch on CUDA) and returns them.

    q, k: [B, H, L, D] (HF's layout; any strides with a contiguous last dim) or [B, L, H·D] projection
    outputs with ``head_dim`` given. cos/sin: [B or 1, L, D] per-token rows, or [P, D] tables when
    ``position_ids`` [B, L] is given (packed sequences: positions restart per sample).

    In place when neither q nor k is a view of another tensor (autograd cannot rewrite two views in one
    Function): pass the projection outputs as [B, L, H·D] to get the in-place path. Views get fresh outputs.
    """
    if q.dim() == 3 or k.dim() == 3:
        if head_dim is None or q.dim() != 3 or k.dim() != 3:
            raise ValueError("3-D q/k ([B, L, H*D]) need head_dim and must both be 3-D")
        if q.shape[-1] % head_dim or k.shape[-1] % head_dim:
            raise ValueError(f"last dims {q.shape[-1]}, {k.shape[-1]} are not multiples of head_dim={head_dim}")
        length, dim = q.shape[1], head_dim
        if q.shape[:2] != k.shape[:2]:
            raise ValueError(f"q and k disagree on [B, L]: {tuple(q.shape)}, {tuple(k.shape)}")
    else:
        if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
            raise ValueError(f"q and k must be [B, H, L, D] with matching B, L, D; got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}")
        length, dim = q.shape[2], q.shape[3]
    if dim % 2:
        raise ValueError(f"head dim must be even, got {dim}")
    if position_ids is None and (cos.dim() != 3 or cos.shape[1] != length or cos.shape[-1] != dim):
        raise ValueError(f"cos/sin must be [B or 1, L={length}, D={dim}]; got {tuple(cos.shape)}")
    if position_ids is not None and (cos.dim() != 2 or cos.shape[-1] != dim):
        raise ValueError(f"with position_ids, cos/sin must be [P, D={dim}] tables; got {tuple(cos.shape)}")
    if resolve_backend(q, backend) == "triton":
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError("q and k need a contiguous last dimension")
        cos, sin = cos.contiguous(), sin.contiguous()
        if position_ids is not None:
            position_ids = position_ids.to(torch.int64)
        inplace = not (q._is_view() or k._is_view())
        return _RopeTriton.apply(q, k, cos, sin, position_ids, head_dim, inplace)
    if q.dim() == 3:
        bsz = q.shape[0]
        q4 = q.view(bsz, length, -1, dim).transpose(1, 2)
        k4 = k.view(bsz, length, -1, dim).transpose(1, 2)
        q_new, k_new = rope_reference(q4, k4, cos, sin, position_ids)
        return (q_new.transpose(1, 2).reshape(q.shape), k_new.transpose(1, 2).reshape(k.shape))
    return rope_reference(q, k, cos, sin, position_ids)
