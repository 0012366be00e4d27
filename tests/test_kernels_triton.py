"""Triton kernels against their PyTorch references (and fp64), forward and backward.

On a machine without CUDA the kernels run in Triton's interpreter, which runs the kernel bodies in NumPy on
CPU tensors: these tests then check the kernels' arithmetic, masking and indexing at small odd sizes; the
GPU tests at the end check real sizes. ``TRITON_INTERPRET=1`` must be set before triton is first imported
(triton.language's own @jit helpers such as tl.sum are decorated at import; imported in compile mode they
fail inside an interpreted kernel with "Cannot call @triton.jit'd outside of the scope of a kernel"), and
other test modules import triton through transformers/peft first. So on CPU the whole module re-runs
itself in a fresh interpreter with the variable set (``tests/test_kernels_triton_interpreter.py``; a
module-level skip here would also skip a runner test placed in this module).
"""

import os

import pytest
import torch

ON_CPU = not torch.cuda.is_available()
IN_CHILD = os.environ.get("RLCORE_TRITON_CHILD") == "1"
if ON_CPU and IN_CHILD:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(ON_CPU and not IN_CHILD, reason="run by tests/test_kernels_triton_interpreter.py")


from rlcore.kernels.rmsnorm import rmsnorm  # noqa: E402
from rlcore.kernels.rope import apply_rope_, rope_cos_sin, rope_reference  # noqa: E402
from rlcore.kernels.selective_logprobs import selective_log_softmax, selective_log_softmax_naive  # noqa: E402
from rlcore.kernels.swiglu import swiglu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# one rounding of a result of magnitude ≲ 4 in each dtype, plus accumulation-order slack
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _close(actual, expected, dtype, scale=1.0):
    torch.testing.assert_close(actual.double(), expected.double(), atol=TOL[dtype] * scale, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_logprobs_triton(dtype):
    n, h, v = 37, 48, 301
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(DEVICE, dtype)
    ids = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    g_logp, g_ent = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        for ent_grad in (False, True):
            h = hidden.detach().clone().requires_grad_()
            logp, ent = selective_log_softmax(h, weight, ids, 0.8, chunk_size=16, return_entropy=True,
                                              backend=backend)
            loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if ent_grad else 0)
            loss.backward()
            results[backend, ent_grad] = (logp.detach(), ent.detach(), h.grad)
    h64 = hidden.detach().double().requires_grad_()
    rl, re = selective_log_softmax_naive(h64, weight.double(), ids, 0.8, True, dtype=torch.float64)
    (rl * g_logp.double()).sum().backward()
    grad_logp_only = h64.grad.clone()
    h64.grad = None
    rl, re = selective_log_softmax_naive(h64, weight.double(), ids, 0.8, True, dtype=torch.float64)
    ((rl * g_logp.double()).sum() + (re * g_ent.double()).sum()).backward()
    for ent_grad, ref_grad in ((False, grad_logp_only), (True, h64.grad)):
        logp, ent, grad = results["triton", ent_grad]
        _close(logp, rl, dtype)
        _close(ent, re, dtype)
        _close(grad, ref_grad, dtype)
        # Triton and the PyTorch reference see the same rounded logits: they agree tighter than with fp64
        torch.testing.assert_close(logp, results["torch", ent_grad][0], atol=TOL[dtype] / 4 + 1e-5, rtol=0)


def test_selective_logprobs_triton_weight_grad():
    n, h, v = 29, 32, 257
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, h, generator=g, device="cpu").to(DEVICE).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(DEVICE).requires_grad_()
    ids = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    logp = selective_log_softmax(hidden, weight, ids, 1.0, chunk_size=8, backend="triton")
    logp.sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    selective_log_softmax_naive(h64, w64, ids, dtype=torch.float64).sum().backward()
    _close(weight.grad, w64.grad, torch.float32)
    _close(hidden.grad, h64.grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_triton(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 5, 48, generator=g) * 2).to(DEVICE, dtype)
    w = (1 + 0.2 * torch.randn(48, generator=g)).to(DEVICE, dtype)
    dy = torch.randn(3, 5, 48, generator=g).to(DEVICE, dtype)
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rmsnorm(xt, wt, 1e-5, backend="triton")
    y.backward(dy)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    y64.backward(dy.double())
    assert y.dtype == dtype
    _close(y, y64, dtype)
    _close(xt.grad, x64.grad, dtype)
    _close(wt.grad, w64.grad, dtype, scale=4)  # a sum over 15 rows
    # frozen weight: no weight gradient computed
    xt.grad = None
    rmsnorm(xt, w, 1e-5, backend="triton").backward(dy)
    _close(xt.grad, x64.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_swiglu_triton(dtype, inplace):
    g = torch.Generator().manual_seed(2)
    gate = (torch.randn(37, 48, generator=g) * 3).to(DEVICE, dtype)  # odd numel, not a block multiple
    up = torch.randn(37, 48, generator=g).to(DEVICE, dtype)
    dh = torch.randn(37, 48, generator=g).to(DEVICE, dtype)
    gt, ut = gate.clone().requires_grad_(), up.clone().requires_grad_()
    # as in the Llama MLP: gate/up are outputs of an op (here a multiply by one), private to the graph
    gate_out, up_out = gt * 1, ut * 1
    h = swiglu(gate_out, up_out, backend="triton", inplace_backward=inplace)
    h.backward(dh)
    if inplace:  # the gradients were written over the saved activations
        torch.testing.assert_close(gate_out.detach(), gt.grad)
        torch.testing.assert_close(up_out.detach(), ut.grad)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    h64 = torch.nn.functional.silu(g64) * u64
    h64.backward(dh.double())
    _close(h, h64, dtype, scale=2)
    _close(gt.grad, g64.grad, dtype, scale=2)
    _close(ut.grad, u64.grad, dtype, scale=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bhld", "blhd_inplace", "positions"])
def test_rope_triton(dtype, layout):
    bsz, length, hq, hk, dim = 2, 7, 4, 2, 12
    g = torch.Generator().manual_seed(4)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, dim, 2).float() / dim))
    pos = torch.randint(0, 30, (bsz, length), generator=g).to(DEVICE)  # arbitrary, e.g. packed restarts
    cos, sin = rope_cos_sin(pos, inv_freq, torch.float64)
    xq = torch.randn(bsz, length, hq * dim, generator=g).to(DEVICE, dtype)
    xk = torch.randn(bsz, length, hk * dim, generator=g).to(DEVICE, dtype)
    dq = torch.randn(bsz, hq, length, dim, generator=g).to(DEVICE, dtype)
    dk = torch.randn(bsz, hk, length, dim, generator=g).to(DEVICE, dtype)

    q64 = xq.double().requires_grad_()
    k64 = xk.double().requires_grad_()
    rq, rk = rope_reference(q64.view(bsz, length, hq, dim).transpose(1, 2),
                            k64.view(bsz, length, hk, dim).transpose(1, 2), cos, sin)
    ((rq * dq.double()).sum() + (rk * dk.double()).sum()).backward()

    xq_t, xk_t = xq.clone().requires_grad_(), xk.clone().requires_grad_()
    qp, kp = xq_t * 1, xk_t * 1  # non-leaf, non-view: the in-place path is allowed
    cos_t, sin_t = cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)
    if layout == "bhld":
        q, k = apply_rope_(qp.view(bsz, length, hq, dim).transpose(1, 2),
                           kp.view(bsz, length, hk, dim).transpose(1, 2), cos_t, sin_t, backend="triton")
    else:
        if layout == "positions":
            table_c, table_s = rope_cos_sin(torch.arange(30)[None], inv_freq, dtype)
            q, k = apply_rope_(qp, kp, table_c[0].to(DEVICE), table_s[0].to(DEVICE), position_ids=pos.to(DEVICE),
                               head_dim=dim, backend="triton")
        else:
            q, k = apply_rope_(qp, kp, cos_t, sin_t, head_dim=dim, backend="triton")
        assert q.data_ptr() == qp.data_ptr() and k.data_ptr() == kp.data_ptr()  # rotated in place
        q = q.view(bsz, length, hq, dim).transpose(1, 2)
        k = k.view(bsz, length, hk, dim).transpose(1, 2)
    ((q * dq).sum() + (k * dk).sum()).backward()
    _close(q, rq, dtype)
    _close(k, rk, dtype)
    _close(xq_t.grad, q64.grad, dtype)
    _close(xk_t.grad, k64.grad, dtype)


def test_int64_flag_switches_on_only_for_long_inputs():
    from rlcore.kernels._utils import needs_int64

    assert not needs_int64(torch.empty(10), torch.empty(2**20, dtype=torch.int8))
    big = torch.empty(1, dtype=torch.int8).expand(2**31)  # 2**31 elements without allocating them
    assert needs_int64(big)
    assert not needs_int64(torch.empty(1, dtype=torch.int8).expand(2**31 - 1))


@pytest.mark.skipif(not ON_CPU, reason="on CUDA forcing Triton is valid")
def test_forcing_triton_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        rmsnorm(torch.randn(2, 8), torch.ones(8), backend="triton")


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_selective_logprobs_llama3_vocab():
    torch.manual_seed(0)
    n, h, v = 4096, 4096, 128256
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02
    ids = torch.randint(0, v, (n,), device="cuda")
    g = torch.randn(n, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp = selective_log_softmax(hidden, weight, ids, 0.9, chunk_size=1024, backend="triton")
    (logp * g).sum().backward()
    peak = torch.cuda.max_memory_allocated() - base
    # Bounded by the chunk, not by N: about two chunk-sized [1024, V] bf16 buffers (logits and their softmax
    # gradient) plus [N, H] buffers; measured 0.56 GB on an H100, where the full [N, V] bf16 logits are 1.05 GB.
    assert peak < 1024 * v * 2 * 2.5 + 3 * n * h * 2
    ref = selective_log_softmax_naive(hidden.detach()[:512], weight, ids[:512], 0.9)
    torch.testing.assert_close(logp[:512].detach(), ref, atol=2e-2, rtol=0)
    h2 = hidden.detach().clone().requires_grad_()
    (selective_log_softmax(h2, weight, ids, 0.9, chunk_size=1024, backend="torch") * g).sum().backward()
    torch.testing.assert_close(hidden.grad.float(), h2.grad.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_elementwise_kernels_real_sizes(dtype):
    torch.manual_seed(0)
    x = torch.randn(8, 640, 4096, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.ones(4096, device="cuda", dtype=dtype)
    y = rmsnorm(x, w, 1e-5, backend="triton")
    torch.testing.assert_close(y, rmsnorm(x, w, 1e-5, backend="torch"), atol=TOL[dtype], rtol=TOL[dtype])
    gate = torch.randn(8 * 640, 14336, device="cuda", dtype=dtype)
    up = torch.randn_like(gate)
    torch.testing.assert_close(swiglu(gate, up, backend="triton"), swiglu(gate, up, backend="torch"),
                               atol=2 * TOL[dtype], rtol=2 * TOL[dtype])
    pos = torch.arange(640, device="cuda")[None].expand(8, -1)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    cos, sin = rope_cos_sin(pos, inv_freq, dtype)
    q = torch.randn(8, 640, 32 * 128, device="cuda", dtype=dtype)
    k = torch.randn(8, 640, 8 * 128, device="cuda", dtype=dtype)
    rq, rk = rope_reference(q.view(8, 640, 32, 128).transpose(1, 2), k.view(8, 640, 8, 128).transpose(1, 2), cos, sin)
    tq, tk = apply_rope_(q.clone(), k.clone(), cos, sin, head_dim=128, backend="triton")
    torch.testing.assert_close(tq.view(8, 640, 32, 128).transpose(1, 2), rq, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(tk.view(8, 640, 8, 128).transpose(1, 2), rk, atol=TOL[dtype], rtol=TOL[dtype])
