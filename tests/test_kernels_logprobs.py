"""selective_log_softmax (PyTorch chunked path) against full-logits fp64, gradients included."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlcore.kernels.selective_logprobs import (CPU_DEFAULT_CHUNK, auto_chunk_size, selective_log_softmax,
                                               selective_log_softmax_naive)

N, H, V = 37, 48, 301


def _inputs(dtype, seed=0, weight_grad=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_(weight_grad)
    ids = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, ids, torch.randn(N, generator=g), torch.randn(N, generator=g)


def _fp64(hidden, weight, ids, temperature, g_logp, g_ent, weight_grad=False):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_(weight_grad)
    logp, ent = selective_log_softmax_naive(h, w, ids, temperature, return_entropy=True, dtype=torch.float64)
    ((logp * g_logp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    return logp, ent, h.grad, w.grad


# logits are rounded to the input dtype by the matmul; these bound that rounding at |logit| ≲ 5
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_entropy_grad", [False, True])
def test_matches_fp64_full_logits(dtype, with_entropy_grad):
    hidden, weight, ids, g_logp, g_ent = _inputs(dtype)
    if not with_entropy_grad:
        g_ent = torch.zeros(N)
    temperature = 0.7
    logp, ent = selective_log_softmax(hidden, weight, ids, temperature, chunk_size=16, return_entropy=True,
                                      backend="torch")
    loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if with_entropy_grad else 0.0)
    loss.backward()
    ref_logp, ref_ent, ref_gh, _ = _fp64(hidden, weight, ids, temperature, g_logp, g_ent)
    tol = TOL[dtype]
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    torch.testing.assert_close(logp.double(), ref_logp, atol=tol, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=tol, rtol=0)
    torch.testing.assert_close(hidden.grad.double(), ref_gh, atol=tol, rtol=tol)


def test_weight_grad_when_weight_trainable():
    hidden, weight, ids, g_logp, g_ent = _inputs(torch.float32, weight_grad=True)
    logp, ent = selective_log_softmax(hidden, weight, ids, 1.3, chunk_size=10, return_entropy=True, backend="torch")
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    _, _, ref_gh, ref_gw = _fp64(hidden, weight, ids, 1.3, g_logp, g_ent, weight_grad=True)
    torch.testing.assert_close(weight.grad.double(), ref_gw, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), ref_gh, atol=2e-5, rtol=1e-5)


def test_result_independent_of_chunk_size():
    hidden, weight, ids, g_logp, _ = _inputs(torch.float32)
    outs = []
    for chunk in (1, 7, N, 1000):
        h = hidden.detach().clone().requires_grad_()
        logp = selective_log_softmax(h, weight, ids, chunk_size=chunk, backend="torch")
        (logp * g_logp).sum().backward()
        outs.append((logp.detach(), h.grad))
    for logp, grad in outs[1:]:
        torch.testing.assert_close(logp, outs[0][0], atol=2e-6, rtol=0)  # 1.4e-6 seen on an H100 (blocking)
        torch.testing.assert_close(grad, outs[0][1], atol=5e-6, rtol=0)  # matmul blocking differs


def test_temperature_changes_result():
    hidden, weight, ids, _, _ = _inputs(torch.float32)
    a = selective_log_softmax(hidden, weight, ids, 1.0, backend="torch")
    b = selective_log_softmax(hidden, weight, ids, 0.5, backend="torch")
    assert (a - b).abs().max() > 1e-2
    torch.testing.assert_close(b, selective_log_softmax_naive(hidden / 0.5, weight, ids), atol=1e-5, rtol=0)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("vocab", [301, 4001])
def test_never_materialises_more_than_one_chunk_of_logits(vocab):
    """The memory bound that matters: no tensor bigger than chunk × V (or the weight) is ever created."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(200, 16, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=g)
    ids = torch.randint(0, vocab, (200,), generator=g)
    with _LargestTensor() as probe:
        logp, ent = selective_log_softmax(hidden, weight, ids, chunk_size=25, return_entropy=True, backend="torch")
        (logp.sum() + ent.sum()).backward()
    assert probe.largest <= max(25 * vocab, weight.numel())
    with _LargestTensor() as naive:
        selective_log_softmax_naive(hidden, weight, ids)
    assert naive.largest >= 200 * vocab  # the probe does see full logits when they exist


def test_no_grad_and_bad_input():
    hidden, weight, ids, _, _ = _inputs(torch.float32)
    with torch.no_grad():
        logp = selective_log_softmax(hidden, weight, ids, backend="torch")
    assert not logp.requires_grad
    with pytest.raises(ValueError, match="token_ids"):
        selective_log_softmax(hidden, weight, torch.full((N,), V), backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(hidden, weight, ids, temperature=0.0, backend="torch")
    with pytest.raises(ValueError, match="hidden must be"):
        selective_log_softmax(hidden, weight[:, :5], ids, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        selective_log_softmax(hidden, weight, ids, backend="cuda-magic")


def test_chunk_size_default_on_cpu(monkeypatch):
    assert auto_chunk_size(10_000, 128_256, torch.device("cpu"), torch.bfloat16, "torch") == CPU_DEFAULT_CHUNK
    monkeypatch.setenv("RLCORE_LOGPROB_CHUNK", "77")
    assert auto_chunk_size(10_000, 128_256, torch.device("cpu"), torch.bfloat16, "torch") == 77
