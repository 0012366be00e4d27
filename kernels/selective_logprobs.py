"""Per-token log-probabilities (and entropies) of chosen tokens, without [tokens × vocab] logits at once.

``selective_log_softmax(hidden, weight, token_ids, temperature)`` is what the trainer calls. The lm_head is
applied to ``chunk_size`` rows at a time; each chunk's logits live only while that chunk is processed.

Two interchangeable row-wise back ends do the softmax part of each chunk:

* ``torch``: logsumexp / gather / entropy with PyTorch ops (the reference, used on CPU);
* ``triton``: one kernel for the row statistics (online logsumexp, target logit, entropy) and one that
  overwrites the chunk's logits with d(output)/d(logits) in place, so a chunk needs one [C × V] buffer in
  the model dtype and nothing in fp32.

Backward. Each output row depends only on its own hidden row, so when the lm_head weight is frozen (the
LoRA case) the forward already computes J[n] = d logp[n] / d hidden[n] (one extra matmul per chunk) and
backward is ``grad_hidden = g_logp[:, None] * J``: 2 matmuls per chunk in all instead of 3 with
recompute-in-backward, and no second pass over the vocabulary. When the weight requires grad, or the
entropy output receives a gradient, backward recomputes the chunk logits instead (needed because the weight
gradient sums ``dlogits^T h`` over tokens with the upstream gradient inside).
"""

import os

import torch

from ._utils import lazy_jit, needs_int64, next_power_of_2, resolve_backend, tl

CPU_DEFAULT_CHUNK = 1024
_MIN_CHUNK, _MAX_CHUNK = 128, 16384
MAX_CHUNK_BYTES = 512 * 2**20


# --------------------------------------------------------------------------------------------- Triton
@lazy_jit
def _row_stats_kernel(logits_ptr, stride_row, ids_ptr, logp_ptr, lse_ptr, ent_ptr, V, inv_temp,
                      BLOCK_V: tl.constexpr, I64: tl.constexpr):
    row = tl.program_id(0)
    if I64:
        row = row.to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    # Per-lane running max / sum / sum(p·z), merged at the end: no loop-carried scalars.
    # A finite floor instead of -inf keeps exp(m_old - m_new) defined on lanes that never see a column.
    m = tl.full([BLOCK_V], -1.0e30, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        mask = idx < V
        z = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, z)
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * scale + e
        t = t * scale + e * tl.where(mask, z, 0.0)  # 0·(-inf) would be NaN
        m = m_new
    m_row = tl.max(m, axis=0)
    w = tl.exp(m - m_row)
    s_row = tl.sum(s * w, axis=0)
    t_row = tl.sum(t * w, axis=0)
    lse = m_row + tl.log(s_row)
    target = tl.load(ids_ptr + row)
    z_target = tl.load(base + target).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, z_target - lse)
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, lse - t_row / s_row)


@lazy_jit
def _row_grad_kernel(logits_ptr, stride_row, ids_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, V, inv_temp,
                     BLOCK_V: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
                     I64: tl.constexpr):
    """Overwrites one row of logits with d(g_logp·logp + g_ent·H)/d(raw logits)."""
    row = tl.program_id(0)
    if I64:
        row = row.to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    target = tl.load(ids_ptr + row)
    g = 0.0
    if HAS_GLOGP:
        g = tl.load(glogp_ptr + row)
    ge = 0.0
    ent = 0.0
    if HAS_GENT:
        ge = tl.load(gent_ptr + row)
        ent = tl.load(ent_ptr + row)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        mask = idx < V
        z = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32) * inv_temp
        log_p = z - lse
        p = tl.exp(log_p)
        # d logp / dz = onehot - p ;  d H / dz = -p (log p + H)
        d = tl.where(idx == target, g, 0.0) - g * p
        if HAS_GENT:
            d = d - ge * p * (log_p + ent)
        tl.store(base + idx, (d * inv_temp).to(logits_ptr.dtype.element_ty), mask=mask)


def _block_v(vocab: int) -> int:
    return min(4096, next_power_of_2(vocab))


def _row_stats_triton(logits: torch.Tensor, ids: torch.Tensor, inv_temp: float):
    rows, vocab = logits.shape
    logp = torch.empty(rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    if rows:
        _row_stats_kernel[(rows,)](logits, logits.stride(0), ids, logp, lse, ent, vocab, inv_temp,
                                   BLOCK_V=_block_v(vocab), I64=needs_int64(logits), num_warps=8)
    return logp, lse, ent


def _row_grad_triton(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
                     g_logp: torch.Tensor | None, g_ent: torch.Tensor | None, inv_temp: float) -> torch.Tensor:
    rows, vocab = logits.shape
    if rows:
        dummy = lse
        _row_grad_kernel[(rows,)](logits, logits.stride(0), ids, lse, ent,
                                  g_logp if g_logp is not None else dummy, g_ent if g_ent is not None else dummy,
                                  vocab, inv_temp, BLOCK_V=_block_v(vocab), HAS_GLOGP=g_logp is not None,
                                  HAS_GENT=g_ent is not None, I64=needs_int64(logits), num_warps=8)
    return logits


# ------------------------------------------------------------------------------------ PyTorch reference
def _row_stats_torch(logits: torch.Tensor, ids: torch.Tensor, inv_temp: float):
    z = logits.float() * inv_temp
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1) - lse
    p = torch.exp(z - lse.unsqueeze(-1))
    ent = lse - (p * z).sum(-1)
    return logp, lse, ent


def _row_grad_torch(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
                    g_logp: torch.Tensor | None, g_ent: torch.Tensor | None, inv_temp: float) -> torch.Tensor:
    log_p = logits.float() * inv_temp - lse.unsqueeze(-1)
    p = torch.exp(log_p)
    d = torch.zeros_like(p)
    if g_logp is not None:
        d -= g_logp.unsqueeze(-1) * p
        d.scatter_add_(-1, ids.long().unsqueeze(-1), g_logp.unsqueeze(-1).float())
    if g_ent is not None:
        d -= g_ent.unsqueeze(-1) * p * (log_p + ent.unsqueeze(-1))
    return (d * inv_temp).to(logits.dtype)


_ROW_OPS = {"torch": (_row_stats_torch, _row_grad_torch), "triton": (_row_stats_triton, _row_grad_triton)}


# -------------------------------------------------------------------------------------------- chunking
def auto_chunk_size(num_tokens: int, vocab: int, device: torch.device, dtype: torch.dtype, backend: str) -> int:
    """Rows per chunk: the smaller of a quarter of the memory free right now and ``MAX_CHUNK_BYTES``,
    divided by what one row of logits costs. The cap keeps the head's working memory flat in N and V: at
    V = 128,256 it is ~2,000 rows, whose [rows × H] @ [H × V] matmul already runs at full speed.

    ``RLCORE_LOGPROB_CHUNK`` overrides. On CPU a fixed default (memory is rarely the limit there).
    """
    override = os.environ.get("RLCORE_LOGPROB_CHUNK")
    if override:
        return max(1, int(override))
    if device.type != "cuda":
        return CPU_DEFAULT_CHUNK
    free, _ = torch.cuda.mem_get_info(device)
    # blocks cached by PyTorch's allocator are free for our purposes
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    item = torch.empty((), dtype=dtype).element_size()
    # triton: the logits buffer, rewritten in place; torch: logits + fp32 z, p and the gradient
    per_row = vocab * (item if backend == "triton" else item + 4 * 4)
    chunk = int(min(free * 0.25, MAX_CHUNK_BYTES)) // max(per_row, 1)
    chunk = max(_MIN_CHUNK, min(_MAX_CHUNK, chunk))
    return min(chunk, max(num_tokens, 1))


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, temperature: float,
                chunk: int, backend: str):
        stats, grad_rows = _ROW_OPS[backend]
        inv_temp = 1.0 / temperature
        n = hidden.shape[0]
        logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp)
        # Precompute d logp/d hidden rows only when that is the whole backward (frozen lm_head).
        precompute = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        jac = torch.empty_like(hidden) if precompute else None
        w = weight.to(hidden.dtype) if weight.dtype != hidden.dtype else weight
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = hidden[start:end] @ w.t()
            lp, ls, en = stats(logits, ids[start:end], inv_temp)
            logp[start:end], lse[start:end], ent[start:end] = lp, ls, en
            if precompute:
                ones = torch.ones(end - start, device=hidden.device, dtype=torch.float32)
                dlogits = grad_rows(logits, ids[start:end], ls, en, ones, None, inv_temp)
                torch.matmul(dlogits, w, out=jac[start:end])
            del logits
        ctx.save_for_backward(hidden, weight, ids, lse, ent, jac)
        ctx.precompute, ctx.inv_temp, ctx.chunk, ctx.backend = precompute, inv_temp, chunk, backend
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: torch.Tensor | None, g_ent: torch.Tensor | None):
        hidden, weight, ids, lse, ent, jac = ctx.saved_tensors
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None
        if ctx.precompute and g_ent is None:
            grad_h = (g_logp.float().unsqueeze(-1) * jac.float()).to(hidden.dtype)
            return grad_h, None, None, None, None, None
        _, grad_rows = _ROW_OPS[ctx.backend]
        w = weight.to(hidden.dtype) if weight.dtype != hidden.dtype else weight
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_w else None
        gl = g_logp.float().contiguous() if g_logp is not None else None
        ge = g_ent.float().contiguous() if g_ent is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            h = hidden[start:end]
            logits = h @ w.t()
            d = grad_rows(logits, ids[start:end], lse[start:end], ent[start:end],
                          gl[start:end] if gl is not None else None, ge[start:end] if ge is not None else None,
                          ctx.inv_temp)
            if want_h:
                torch.matmul(d, w, out=grad_h[start:end])
            if want_w:
                grad_w.addmm_(d.t().float(), h.float())
            del logits, d
        return grad_h, (grad_w.to(weight.dtype) if want_w else None), None, None, None, None


def selective_log_softmax(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor,
                          temperature: float = 1.0, chunk_size: int | None = None, return_entropy: bool = False,
                          backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(hidden @ weight.T / temperature)[n, token_ids[n]]`` for every row n, in chunks.

    Args:
        hidden: [N, H] final hidden states (after the last norm), any float dtype; the matmul runs in it.
        weight: [V, H] lm_head weight (normally frozen; gets a gradient only if it requires one).
        token_ids: [N] integer ids whose log-probability is wanted (the *next* token of each position).
        temperature: logits are divided by it before the softmax, as GRPO does with the sampling temperature.
        chunk_size: rows per chunk; ``None`` picks one from free GPU memory (``auto_chunk_size``), 1024 on CPU.
        return_entropy: also return the entropy of each row's distribution (differentiable too).
        backend: ``"triton"``, ``"torch"`` or ``None`` = ``RLCORE_KERNELS`` env var, else Triton on CUDA.

    Returns:
        logp [N] float32, and entropy [N] float32 when ``return_entropy``. Both accept any upstream gradient
        (the GRPO loss is not a cross-entropy); the gradient flows to ``hidden`` (and ``weight`` if it
        requires grad). At most ``chunk_size × V`` logits exist at any time.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if token_ids.shape != hidden.shape[:1]:
        raise ValueError(f"token_ids must be [N]={hidden.shape[0]}, got {tuple(token_ids.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= weight.shape[0]):
        raise ValueError(f"token_ids must lie in [0, {weight.shape[0]}); got min {int(token_ids.min())}, "
                         f"max {int(token_ids.max())}")
    chosen = resolve_backend(hidden, backend)
    if chunk_size is None:
        chunk_size = auto_chunk_size(hidden.shape[0], weight.shape[0], hidden.device, hidden.dtype, chosen)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    ids = token_ids.contiguous()
    if chosen == "triton":
        ids = ids.to(torch.int64)
    logp, ent = _SelectiveLogSoftmax.apply(hidden.contiguous(), weight, ids, float(temperature), int(chunk_size),
                                           chosen)
    return (logp, ent) if return_entropy else logp


def selective_log_softmax_naive(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor,
                                temperature: float = 1.0, return_entropy: bool = False,
                                dtype: torch.dtype | None = None):
    """Full-logits reference (what HF + TRL do): [N, V] logits, log_softmax, gather. ``dtype`` upcasts
    the inputs first (fp64 for tests)."""
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    logits = (hidden @ weight.t()).to(dtype or torch.float32) / temperature
    logps = torch.log_softmax(logits, dim=-1)
    logp = logps.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    return logp, -(logps.exp() * logps).sum(-1)
