"""Per-op comparison at Llama-3-8B shapes: our Triton kernels vs Liger-Kernel vs plain PyTorch.

Ops (T tokens, bf16; every row is forward + backward):
  rmsnorm        x [T, 4096], weight [4096] frozen (LoRA case), eps 1e-5
                 torch: rmsnorm_reference (HF LlamaRMSNorm); ours: rmsnorm; liger: LigerRMSNormFunction with
                 Liger's Llama settings (casting_mode="llama", in_place=True: dX written over dY)
  rope           q [1, T, 32*128], k [1, T, 8*128], cos/sin [1, T, 128], rope_theta 500000
                 torch: rope_reference on [B, H, L, D] views (HF apply_rotary_pos_emb); ours: apply_rope_ on the
                 [B, L, H*D] projection outputs (in place, as kernels/apply.py calls it); liger: LigerRopeFunction
                 on the same [B, H, L, D] views as torch (it rotates their storage in place, forward and backward)
  swiglu         gate, up [T, 14336]; torch: F.silu(gate) * up; ours: swiglu; ours-inplace: swiglu with
                 inplace_backward=True (what kernels/apply.py uses); liger: LigerSiLUMulFunction (its backward
                 always writes the gradients over gate and up)
  logprobs       per-token log-probs: hidden [T, 4096], lm_head [128256, 4096] frozen, temperature 0.9,
                 backward of (logp * g).sum() for a random g [T]
                 torch: full logits -> fp32 log_softmax -> gather; ours: selective_log_softmax
  logprobs+grpo  the same head plus a clipped GRPO loss (old logp = current, detached; beta 0; loss_type grpo:
                 per-sequence token mean, averaged over B = T / seq_len sequences)
                 torch: naive log-probs + loss; ours: selective_log_softmax + loss; liger:
                 LigerFusedLinearGRPOLoss (a whole fused loss, not per-token log-probs; compiled=False)

Method. Per rep, fresh inputs are made outside the timed region: leaves (requires_grad) are cloned into the
"activations" each op consumes, and upstream gradients are cloned too, so in-place variants (ours rope,
Liger's rope / RMSNorm / SwiGLU, ours-inplace) never see data an earlier rep overwrote. The clone is the same
for every variant and is not timed. Timed: forward + torch.autograd.grad(outputs, leaves, upstream) (the
clone's backward is an identity). GPU: CUDA events around each rep, median of --reps after --warmup untimed
reps. With --timing gpu (default) a spin kernel queued before the start event lets the CPU issue the whole
call first, so the time is the GPU running the op's kernels back to back (launch and Python overhead hidden, as
in a training step where the CPU runs ahead; a host sync inside an op still counts); --timing wall starts from
an idle GPU, overhead included. "host ms" is the CPU time to issue the call. Peak = max_memory_allocated()
during the rep minus memory allocated at its start (inputs excluded; outputs, gradients and temporaries
included). CPU (--smoke): perf_counter, no memory.

Numerics, from one untimed run of each variant on identical inputs: max |difference| of outputs and of input
gradients against the torch reference (dout/dgrad) and against the same reference evaluated in fp32 (fp64 on
CPU) from the same (rounded) inputs (err out / err grad), so one can tell which side of a difference is
closer to exact arithmetic.

  python benchmarks/kernel_ops.py                                    # H100: T = 5120, 10240, all ops
  python benchmarks/kernel_ops.py --tokens 5120 --ops rmsnorm,swiglu --reps 50 --json out.json
  python benchmarks/kernel_ops.py --timing wall --chunk 4096       # launch overhead counted; fixed head chunk
  python benchmarks/kernel_ops.py --smoke                            # CPU, tiny shapes: checks the script

Liger rows need liger_kernel importable and CUDA; otherwise they are skipped with the reason. In --smoke on CPU
our kernels run in Triton's interpreter when TRITON_INTERPRET=1 was set before start, else through their
PyTorch fallbacks (then "ours" is the reference path and its differences are 0).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _import_kernels():
    """``rlcore.kernels`` when installed; from a plain checkout, the ``kernels/`` folder as a package."""
    try:
        import rlcore.kernels as kernels

        return kernels
    except Exception:
        # pyproject maps rlcore.kernels to ./kernels only in an install; the folder has relative imports only
        path = os.path.join(ROOT, "kernels", "__init__.py")
        spec = importlib.util.spec_from_file_location("rlcore_kernels_checkout", path,
                                                      submodule_search_locations=[os.path.dirname(path)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


K = _import_kernels()
_utils = sys.modules[K.__name__ + "._utils"]
_swiglu_mod = sys.modules[K.__name__ + ".swiglu"]

OPS = ("rmsnorm", "rope", "swiglu", "logprobs")
EPS = 1e-5
TEMPERATURE = 0.9
CLIP_EPS = 0.2
ROPE_THETA = 500000.0


@dataclass
class Dims:
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128256
    seq_len: int = 640


SMOKE_DIMS = Dims(hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, vocab=300, seq_len=16)


@dataclass
class Rep:
    """One rep's inputs: leaves to differentiate, the tensors the op consumes, the upstream gradients."""
    leaves: list[torch.Tensor]
    args: dict[str, Any]
    grads: list[torch.Tensor] | None  # None: the output is a scalar loss


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[torch.dtype | None], Rep]  # dtype: upcast everything floating (the exact reference)
    impls: dict[str, Callable[[dict[str, Any]], tuple[torch.Tensor, ...]] | str]  # str: why skipped
    note: str = ""
    exact: Callable[[dict[str, Any]], tuple[torch.Tensor, ...]] | None = None  # default: impls["torch"]


@dataclass
class Row:
    op: str
    shape: str
    impl: str
    ms: float = float("nan")
    host_ms: float = float("nan")    # CPU time to issue forward+backward
    peak_mib: float = float("nan")
    x_torch: float = float("nan")   # torch time / this time (>1: faster than torch)
    x_liger: float = float("nan")
    mem_torch: float = float("nan")  # this peak / torch peak
    mem_liger: float = float("nan")
    dout: float = float("nan")      # max |out - torch out|
    dgrad: float = float("nan")     # max |grad - torch grad| over all input gradients
    err_out: float = float("nan")   # max |out - exact out|, exact = torch reference in fp32/fp64
    err_grad: float = float("nan")
    ref_out_max: float = float("nan")   # max |exact out|, max |exact grad|: the scale of the differences
    ref_grad_max: float = float("nan")
    ulp_out: float = float("nan")       # spacing of the torch row's output / gradient dtype at those magnitudes
    ulp_grad: float = float("nan")
    reps: int = 0
    note: str = ""
    error: str = ""
    times_ms: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- helpers
def _liger_status(device: torch.device) -> tuple[Any, str]:
    """(module namespace or None, why not)."""
    if device.type != "cuda":
        return None, "needs CUDA"
    try:
        import liger_kernel  # noqa: F401
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception as exc:  # not installed, or broken against this torch/triton
        return None, f"liger_kernel not importable ({type(exc).__name__}: {str(exc)[:100]})"
    ns = argparse.Namespace(rms=LigerRMSNormFunction, rope=LigerRopeFunction, swiglu=LigerSiLUMulFunction,
                            grpo=LigerFusedLinearGRPOLoss)
    return ns, ""


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "-"


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or "-"
    except Exception:
        return "-"


def _randn(shape, gen: torch.Generator, device, dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)


def _leaf(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A fresh leaf holding ``t`` (upcast to ``dtype`` if given); no copy when not upcast."""
    return (t.to(dtype) if dtype is not None else t).detach().requires_grad_(True)


def _const(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if (dtype is not None and t.is_floating_point()) else t


def _match(g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """An upstream gradient stored as [B, L, H*D] viewed like a [B, H, L, D] output (no copy)."""
    if g.shape == out.shape:
        return g
    if out.dim() == 4 and g.dim() == 3:
        b, h, length, d = out.shape
        return g.view(b, length, h, d).transpose(1, 2)
    raise ValueError(f"gradient {tuple(g.shape)} does not fit output {tuple(out.shape)}")


def _canon(t: torch.Tensor) -> torch.Tensor:
    """Outputs in one layout for comparison: [B, H, L, D] -> [B, L, H*D]."""
    if t.dim() == 4:
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)
    return t


def _maxdiff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        d = (_canon(x).double() if x.device.type == "cpu" else _canon(x).float()) - \
            (_canon(y).double() if y.device.type == "cpu" else _canon(y).float())
        worst = max(worst, float(d.abs().max()) if d.numel() else 0.0)
    return worst


def _absmax(ts: list[torch.Tensor]) -> float:
    return max((float(t.abs().max()) for t in ts if t.numel()), default=0.0)


def _spacing(v: float, dtype: torch.dtype) -> float:
    """Distance between neighbouring ``dtype`` numbers around magnitude ``v`` (one ulp)."""
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(v)) if v > 0 else 0.0


def grpo_loss(logp: torch.Tensor, advantages: torch.Tensor, eps: float = CLIP_EPS) -> torch.Tensor:
    """Clipped GRPO loss, first iteration (old = current, detached), no KL, every token of a [B, L] batch
    counted: mean over a sequence's tokens, then over sequences (Liger's loss_type="grpo" with a full mask)."""
    ratio = torch.exp(logp - logp.detach())
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    return per_token.mean(-1).sum() / logp.shape[0]


# ------------------------------------------------------------------------------------------------ cases
def case_rmsnorm(tokens: int, dims: Dims, device, dtype, backend, liger, chunk=None) -> Case:
    gen = torch.Generator().manual_seed(1)
    x0 = _randn((tokens, dims.hidden), gen, device, dtype)
    w0 = _randn((dims.hidden,), gen, device, dtype, scale=0.1, shift=1.0)
    dy0 = _randn((tokens, dims.hidden), gen, device, dtype)

    def make(up: torch.dtype | None) -> Rep:
        x = _leaf(x0, up)
        return Rep([x], {"x": x.clone(), "w": _const(w0, up)}, [_const(dy0, up).clone()])

    impls: dict[str, Any] = {
        "torch": lambda a: (K.rmsnorm_reference(a["x"], a["w"], EPS),),
        "ours": lambda a: (K.rmsnorm(a["x"], a["w"], EPS, backend=backend),),
    }
    impls["liger"] = (lambda a: (liger.rms.apply(a["x"], a["w"], EPS, 0.0, "llama", True, None),)) if liger else None

    def exact(a):  # the reference computes in fp32 whatever the input dtype; this one in the input's
        x = a["x"]
        return (a["w"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)),)

    return Case("rmsnorm", f"{tokens}x{dims.hidden}", make, impls, "weight frozen; liger in_place=True", exact)


def case_rope(tokens: int, dims: Dims, device, dtype, backend, liger, chunk=None) -> Case:
    gen = torch.Generator().manual_seed(2)
    hq, hk, d = dims.heads, dims.kv_heads, dims.head_dim
    q0 = _randn((1, tokens, hq * d), gen, device, dtype)
    k0 = _randn((1, tokens, hk * d), gen, device, dtype)
    dq0 = _randn((1, tokens, hq * d), gen, device, dtype)
    dk0 = _randn((1, tokens, hk * d), gen, device, dtype)
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    positions = torch.arange(tokens, device=device)[None]
    cos0, sin0 = K.rope_cos_sin(positions, inv_freq.to(device), dtype)  # [1, T, D], in the model dtype as HF

    def make(up: torch.dtype | None) -> Rep:
        q, k = _leaf(q0, up), _leaf(k0, up)
        return Rep([q, k], {"q": q.clone(), "k": k.clone(), "cos": _const(cos0, up), "sin": _const(sin0, up)},
                   [_const(dq0, up).clone(), _const(dk0, up).clone()])

    def heads(t: torch.Tensor) -> torch.Tensor:  # HF: proj(x).view(B, L, H, D).transpose(1, 2)
        return t.view(t.shape[0], t.shape[1], -1, d).transpose(1, 2)

    impls: dict[str, Any] = {
        "torch": lambda a: K.rope_reference(heads(a["q"]), heads(a["k"]), a["cos"], a["sin"]),
        "ours": lambda a: K.apply_rope_(a["q"], a["k"], a["cos"], a["sin"], head_dim=d, backend=backend),
    }
    impls["liger"] = (lambda a: liger.rope.apply(heads(a["q"]), heads(a["k"]), a["cos"], a["sin"])) if liger else None
    return Case("rope", f"1x{tokens}x({hq}+{hk})x{d}", make, impls,
                "ours/liger in place; inputs cloned outside the timed region for all")


def case_swiglu(tokens: int, dims: Dims, device, dtype, backend, liger, chunk=None) -> Case:
    gen = torch.Generator().manual_seed(3)
    g0 = _randn((tokens, dims.intermediate), gen, device, dtype)
    u0 = _randn((tokens, dims.intermediate), gen, device, dtype)
    dh0 = _randn((tokens, dims.intermediate), gen, device, dtype)

    def make(up: torch.dtype | None) -> Rep:
        g, u = _leaf(g0, up), _leaf(u0, up)
        return Rep([g, u], {"g": g.clone(), "u": u.clone()}, [_const(dh0, up).clone()])

    impls: dict[str, Any] = {
        "torch": lambda a: (F.silu(a["g"]) * a["u"],),
        "ours": lambda a: (K.swiglu(a["g"], a["u"], backend=backend),),
    }
    import inspect

    if "inplace_backward" in inspect.signature(_swiglu_mod.swiglu).parameters:
        impls["ours-inplace"] = lambda a: (K.swiglu(a["g"], a["u"], backend=backend, inplace_backward=True),)
    impls["liger"] = (lambda a: (liger.swiglu.apply(a["g"], a["u"]),)) if liger else None
    return Case("swiglu", f"{tokens}x{dims.intermediate}", make, impls, "liger bwd writes grads over gate/up")


def _chunk_note(tokens: int, dims: Dims, device, dtype, backend, chunk) -> str:
    if chunk:
        return f"T={tokens}: ours chunk {chunk} rows"
    auto = K.auto_chunk_size(tokens, dims.vocab, device, dtype, _utils.resolve_backend(torch.empty(0, device=device),
                                                                                          backend))
    return f"T={tokens}: ours chunk {auto} rows (auto_chunk_size at the time)"


def _head_inputs(tokens: int, dims: Dims, device, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    h0 = _randn((tokens, dims.hidden), gen, device, dtype)
    w = _randn((dims.vocab, dims.hidden), gen, device, dtype, scale=0.02)
    ids = torch.randint(0, dims.vocab, (tokens,), generator=gen).to(device)
    return gen, h0, w, ids


def case_logprobs(tokens: int, dims: Dims, device, dtype, backend, liger, chunk=None) -> Case:
    gen, h0, w0, ids = _head_inputs(tokens, dims, device, dtype, 4)
    g0 = torch.randn(tokens, generator=gen).to(device)

    def make(up: torch.dtype | None) -> Rep:
        h = _leaf(h0, up)
        return Rep([h], {"h": h.clone(), "w": _const(w0, up), "ids": ids}, [g0.clone()])

    impls: dict[str, Any] = {
        "torch": lambda a: (K.selective_log_softmax_naive(a["h"], a["w"], a["ids"], TEMPERATURE),),
        "ours": lambda a: (K.selective_log_softmax(a["h"], a["w"], a["ids"], TEMPERATURE, chunk_size=chunk,
                                                   backend=backend),),
    }
    def exact(a):
        return (K.selective_log_softmax_naive(a["h"], a["w"], a["ids"], TEMPERATURE, dtype=a["h"].dtype),)

    note = "per-token logp, no Liger equivalent (see logprobs+grpo); " + _chunk_note(tokens, dims, device, dtype,
                                                                                      backend, chunk)
    return Case("logprobs", f"{tokens}x{dims.hidden}xV{dims.vocab}", make, impls, note, exact)


def case_grpo(tokens: int, dims: Dims, device, dtype, backend, liger, chunk=None) -> Case:
    gen, h0, w0, ids = _head_inputs(tokens, dims, device, dtype, 5)
    bsz = tokens // dims.seq_len if tokens % dims.seq_len == 0 and tokens >= dims.seq_len else 1
    length = tokens // bsz
    adv = torch.randn(bsz, generator=gen).to(device)
    ids2 = ids.view(bsz, length)
    mask = torch.ones(bsz, length, dtype=torch.int64, device=device)
    liger_loss = liger.grpo(beta=0.0, use_ref_model=False, compiled=False, loss_type="grpo",
                            temperature=TEMPERATURE, epsilon_low=CLIP_EPS, epsilon_high=CLIP_EPS) if liger else None

    def make(up: torch.dtype | None) -> Rep:
        h = _leaf(h0, up)
        return Rep([h], {"h": h.clone(), "w": _const(w0, up)}, None)

    def torch_path(a, exact: bool = False):
        logp = K.selective_log_softmax_naive(a["h"], a["w"], ids, TEMPERATURE,
                                             dtype=a["h"].dtype if exact else None).view(bsz, length)
        return (grpo_loss(logp, adv.to(logp.dtype)),)

    def ours_path(a):
        logp = K.selective_log_softmax(a["h"], a["w"], ids, TEMPERATURE, chunk_size=chunk,
                                       backend=backend).view(bsz, length)
        return (grpo_loss(logp, adv),)

    def liger_path(a):
        out = liger_loss(a["h"].view(bsz, length, -1), a["w"], ids2, mask, adv)
        return (out[0] if isinstance(out, (tuple, list)) else out,)

    impls: dict[str, Any] = {"torch": torch_path, "ours": ours_path, "liger": liger_path if liger else None}
    return Case("logprobs+grpo", f"{bsz}x{length}x{dims.hidden}xV{dims.vocab}", make, impls,
                f"liger: whole fused loss; out = the loss; {_chunk_note(tokens, dims, device, dtype, backend, chunk)}",
                lambda a: torch_path(a, exact=True))


CASES = {"rmsnorm": [case_rmsnorm], "rope": [case_rope], "swiglu": [case_swiglu],
         "logprobs": [case_logprobs, case_grpo]}


# ---------------------------------------------------------------------------------------------- running
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _step(fn, rep: Rep) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    outs = fn(rep.args)
    grads_out = None if rep.grads is None else [_match(g, o) for g, o in zip(rep.grads, outs)]
    grads = torch.autograd.grad(outs, rep.leaves, grads_out)
    return outs, grads


class Timer:
    """Per-rep timing. ``gpu`` mode (CUDA default): a spin kernel (torch.cuda._sleep) is queued before the start
    event, long enough for the CPU to issue the whole forward+backward behind it, so the events measure the GPU
    executing the op's kernels back to back, as in a training step where the CPU runs ahead. A host sync inside
    an op (e.g. a .item()) still shows, as it should. ``wall`` mode: events from an idle, synchronized GPU, so
    launch and Python overhead count. Host time (CPU time to issue the call, from reps without the spin) is
    reported in both modes."""

    def __init__(self, device: torch.device, mode: str) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        self.mode = mode if self.cuda and hasattr(torch.cuda, "_sleep") else "wall"
        self.cycles_per_ms = 0.0
        if self.cuda and self.mode == "gpu":
            torch.cuda._sleep(1000)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(20_000_000)
            end.record()
            torch.cuda.synchronize(device)
            self.cycles_per_ms = 20_000_000 / max(start.elapsed_time(end), 1e-3)

    def rep(self, fn, rep: Rep, spin_ms: float) -> tuple[float, float, float]:
        """(ms, host ms, peak MiB) of one forward+backward."""
        _sync(self.device)
        if not self.cuda:
            t0 = time.perf_counter()
            outs, grads = _step(fn, rep)
            ms = (time.perf_counter() - t0) * 1e3
            del outs, grads
            return ms, ms, float("nan")
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if spin_ms > 0:
            torch.cuda._sleep(int(spin_ms * self.cycles_per_ms))
        start.record()
        t0 = time.perf_counter()
        outs, grads = _step(fn, rep)
        host = (time.perf_counter() - t0) * 1e3
        end.record()
        torch.cuda.synchronize(self.device)
        mib = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        del outs, grads
        return start.elapsed_time(end), host, mib


def run_impl(case: Case, fn, timer: Timer, reps: int, warmup: int) -> tuple[list[float], float, float]:
    """Timings (ms) of ``reps`` reps after ``warmup`` untimed ones, the median host ms, and the largest per-rep
    peak (MiB; nan on CPU). In gpu mode the warm-up reps (at least one) measure the host time that sizes the
    spin: 1.5 x host + 0.5 ms."""
    spin = timer.mode == "gpu"
    if spin:
        warmup = max(warmup, 1)
    times, hosts, peak = [], [], float("nan")
    spin_ms = 0.0
    for i in range(warmup + reps):
        if spin and i == warmup:
            spin_ms = min(1.5 * statistics.median(hosts) + 0.5, 2000.0)
        ms, host, mib = timer.rep(fn, case.make(None), spin_ms)
        if i < warmup:
            hosts.append(host)
            continue
        if not spin:
            hosts.append(host)
        times.append(ms)
        peak = mib if math.isnan(peak) else max(peak, mib)
    return times, statistics.median(hosts) if hosts else float("nan"), peak


def reference_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" else torch.float32


def run_case(case: Case, timer: Timer, reps: int, warmup: int) -> list[Row]:
    device = timer.device
    rows: list[Row] = []
    # exact reference: the torch path on the same (rounded) inputs upcast to fp32 / fp64
    exact = None
    try:
        prev_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        outs, grads = _step(case.exact or case.impls["torch"], case.make(reference_dtype(device)))
        exact = ([o.detach() for o in outs], [g.detach() for g in grads])
        del outs, grads
    except Exception as exc:  # OOM at the largest shapes: the err columns stay empty
        print(f"  {case.op} {case.shape}: no exact reference ({type(exc).__name__})", flush=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
        _free(device)
    results: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for name, fn in case.impls.items():
        row = Row(case.op, case.shape, name, note=case.note if name != "torch" else "")
        rows.append(row)
        if fn is None or isinstance(fn, str):
            row.error = f"skipped: {fn or 'liger unavailable'}"
            continue
        try:
            outs, grads = _step(fn, case.make(None))  # numerics run (also the first warm-up)
            results[name] = ([_canon(o).detach() for o in outs], [g.detach() for g in grads])
            del outs, grads
            times, host, peak = run_impl(case, fn, timer, reps, warmup)
            row.times_ms, row.reps = times, len(times)
            row.ms, row.host_ms, row.peak_mib = statistics.median(times), host, peak
        except torch.OutOfMemoryError:
            row.error = "OOM"
        except Exception as exc:  # one failing variant must not hide the others' numbers
            row.error = f"{type(exc).__name__}: {str(exc)[:160]}"
        finally:
            _free(device)
    ref = results.get("torch")
    by_name = {r.impl: r for r in rows}
    for row in rows:
        got = results.get(row.impl)
        if got is None:
            continue
        if ref is not None:
            row.dout, row.dgrad = _maxdiff(got[0], ref[0]), _maxdiff(got[1], ref[1])
        if exact is not None:
            row.err_out, row.err_grad = _maxdiff(got[0], exact[0]), _maxdiff(got[1], exact[1])
            row.ref_out_max, row.ref_grad_max = _absmax(exact[0]), _absmax(exact[1])
            if ref is not None:
                row.ulp_out = _spacing(row.ref_out_max, ref[0][0].dtype)
                row.ulp_grad = _spacing(row.ref_grad_max, ref[1][0].dtype)
        for base_name, t_attr, m_attr in (("torch", "x_torch", "mem_torch"), ("liger", "x_liger", "mem_liger")):
            base = by_name.get(base_name)
            if base is not None and not base.error and not math.isnan(row.ms):
                setattr(row, t_attr, base.ms / row.ms)
                if base.peak_mib > 0:
                    setattr(row, m_attr, row.peak_mib / base.peak_mib)
    return rows


# ---------------------------------------------------------------------------------------------- output
def _f(v: float, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{width}{spec}}"


HEADER = (f"{'op':14} {'shape':22} {'impl':12} {'fwd+bwd ms':>10} {'host ms':>8} {'peak MiB':>9} {'x torch':>7} "
          f"{'x liger':>7} {'mem/torch':>9} {'mem/liger':>9} {'dout':>8} {'dgrad':>8} {'err out':>8} {'err grad':>8}")


def format_row(r: Row) -> str:
    head = f"{r.op:14} {r.shape:22} {r.impl:12} "
    if r.error:
        return head + r.error
    return (head + _f(r.ms, ".3f", 10) + " " + _f(r.host_ms, ".3f", 8) + " " + _f(r.peak_mib, ".1f", 9) + " "
            + _f(r.x_torch, ".2f", 7) + " " + _f(r.x_liger, ".2f", 7) + " " + _f(r.mem_torch, ".2f", 9) + " "
            + _f(r.mem_liger, ".2f", 9) + " " + _f(r.dout, ".1e", 8) + " " + _f(r.dgrad, ".1e", 8) + " "
            + _f(r.err_out, ".1e", 8) + " " + _f(r.err_grad, ".1e", 8))


def format_scale(r: Row) -> str:
    """The magnitudes the differences compare against, and one ulp there."""
    return (f"{'':14} {'':22} {'(scale)':12} max |out| {r.ref_out_max:.3g} (ulp {r.ulp_out:.1e}), "
            f"max |grad| {r.ref_grad_max:.3g} (ulp {r.ulp_grad:.1e})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default=None, help="comma list of T (default 5120,10240; --smoke: 64)")
    parser.add_argument("--reps", type=int, default=None, help="timed reps per variant (default 20; smoke 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed reps before them, besides the numerics run (default 3; smoke 0)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {','.join(OPS)}")
    parser.add_argument("--seq-len", type=int, default=None, help="GRPO sequence length L, B = T / L (default 640)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, CPU unless CUDA: checks the script")
    parser.add_argument("--timing", choices=("gpu", "wall"), default="gpu",
                        help="gpu: kernels back to back behind a queued spin (launch overhead hidden); wall: from an "
                             "idle GPU, launch overhead included (see Timer)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="rows per chunk for ours selective_log_softmax (default: its auto choice)")
    parser.add_argument("--json", default=None, help="write rows and versions to this path")
    args = parser.parse_args(argv)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {OPS}")
    cuda = torch.cuda.is_available()
    if args.smoke:
        device = torch.device("cuda" if cuda else "cpu")
        dtype, dims, tokens, reps, warmup = torch.float32, SMOKE_DIMS, [64], 1, 0
    else:
        if not cuda:
            print("needs a CUDA GPU (use --smoke on CPU)", file=sys.stderr)
            return 2
        device, dtype, dims, tokens, reps, warmup = torch.device("cuda"), torch.bfloat16, Dims(), [5120, 10240], 20, 3
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    reps = args.reps or reps
    warmup = warmup if args.warmup is None else args.warmup
    if args.seq_len:
        dims = Dims(**{**asdict(dims), "seq_len": args.seq_len})

    # ours: Triton wherever it can run (CUDA, or CPU under TRITON_INTERPRET=1), else the PyTorch fallback
    probe = torch.empty(1, device=device)
    ours_backend = "triton" if (_utils.HAS_TRITON and (cuda or _utils.interpreting())) else None
    ours_desc = _utils.resolve_backend(probe, ours_backend)
    if device.type == "cpu":
        ours_desc += (" (Triton interpreter)" if ours_backend
                      else " fallback (no CUDA; TRITON_INTERPRET=1 runs the kernels)")
    liger, why_not = _liger_status(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    timer = Timer(device, args.timing)
    meta = {"device": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
            "liger_kernel": _version("liger_kernel") if liger else f"- ({why_not})", "rlcore": _git_rev(),
            "dtype": str(dtype).replace("torch.", ""), "ours_backend": ours_desc, "reps": reps, "warmup": warmup,
            "dims": asdict(dims), "tokens": tokens, "timing": timer.mode}
    print(f"device={gpu} torch={meta['torch']} cuda={meta['cuda']} triton={meta['triton']} "
          f"liger_kernel={_version('liger_kernel') if liger else '-'} rlcore={meta['rlcore']}")
    print(f"dtype={meta['dtype']} reps={reps} (median) warmup={warmup} timing={timer.mode} ours={ours_desc}")
    if not liger:
        print(f"liger rows skipped: {why_not}")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        print(f"GPU memory free at start: {free / 2**30:.1f} of {total / 2**30:.1f} GiB")
    print("fwd+bwd ms: median GPU time (timing=gpu: launch overhead hidden; wall: included); host ms: CPU time to "
          "issue the call; peak MiB: allocator peak above the inputs\nx torch / x liger: their time / this time "
          "(>1 = faster); mem/*: this peak / their peak\ndout, dgrad: max |diff| vs the torch row; err out, "
          "err grad: max |diff| vs the same math in "
          f"{str(reference_dtype(device)).replace('torch.', '')} on the same (rounded) inputs", flush=True)

    rows: list[Row] = []
    for t in tokens:
        for op in ops:
            for build in CASES[op]:
                case = build(t, dims, device, dtype, ours_backend, liger, args.chunk)
                if not liger and "liger" in case.impls:
                    case.impls["liger"] = why_not
                case_rows = run_case(case, timer, reps, warmup)
                rows.extend(case_rows)
                for r in case_rows:
                    status = r.error or f"{r.ms:.3f} ms (host {r.host_ms:.3f}), peak {r.peak_mib:.1f} MiB"
                    print(f"  {r.op} {r.shape} {r.impl}: {status}", flush=True)
                del case
                _free(device)

    print("\n" + HEADER)
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.shape), []).append(r)
    for i, group in enumerate(groups.values()):
        if i:
            print()
        for r in group:
            print(format_row(r))
        scaled = [r for r in group if not math.isnan(r.ulp_out)]
        if scaled:
            print(format_scale(scaled[0]))
    notes = list(dict.fromkeys((r.op, r.note) for r in rows if r.note))
    if notes:
        print("\nnotes:")
        for op, note in notes:
            print(f"  {op}: {note}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, fh, indent=1)
        print(f"wrote {args.json}")
    failed = [r for r in rows if r.error and not r.error.startswith("skipped") and r.error != "OOM"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
