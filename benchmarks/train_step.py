"""One GRPO-like policy step (forward + per-token log-probs + loss + backward) at Llama-3-8B shapes.

Compares, side by side in one process:
  naive  HF LlamaForCausalLM + PEFT LoRA, full logits → fp32 log_softmax → gather
  liger  Liger-Kernel (if importable): apply_liger_kernel_to_llama (rope, swiglu, rms_norm) on the same model
         + LigerFusedLinearGRPOLoss (no reference model, beta 0) for the head and loss
  ours   rlcore.kernels.apply_kernels(rope, swiglu, rmsnorm, lora) + selective_log_softmax
Model: Llama-3-8B config written below, random bf16 weights created directly on the GPU (no download);
LoRA r16 on all 7 projections; gradient checkpointing (non-reentrant); SDPA attention.

Throughput counts only the measured step. MFU uses *model* FLOPs per token (recomputation by checkpointing
not counted): frozen weights cost 2N (forward) + 2N (backward w.r.t. activations; no weight gradients) = 4N
with N the non-embedding parameters incl. lm_head; LoRA adds 6 × trainable; causal attention adds
6 · n_layers · L · d_model (forward 2·L·d: QKᵀ and PV over L/2 keys on average; backward twice that).
Peak = torch.cuda.max_memory_allocated during the step; "act" = peak minus memory held before the step
(weights, LoRA, optimizer-free).

  python benchmarks/train_step.py                 # full table (32 layers), < 8 min on an H100
  python benchmarks/train_step.py --quick         # fewer shapes/steps
  python benchmarks/train_step.py --longest       # also search the longest single completion that trains
  python benchmarks/train_step.py --smoke         # CPU, tiny model: checks the script runs

Variants (rows named method+variant):
  naive-nockpt   naive without gradient checkpointing (how much of ours comes from not recomputing)
  ours-keep      ours with the last layers left out of checkpointing while their saved activations fit
                 --keep-gib (rlcore.kernels.recompute; the trainer's ``activation_memory_gib``)
  ours-offload   ours with activation offload (checkpoints in pinned host memory)
  ours-ragged    rows of real lengths uniform in [L/4, L] (seeded), right-padded, through rlcore.logprobs;
  ours-packed    the same rows packed into one (padding_free); tok/s counts real tokens for both
  --profile M,…  torch.profiler tables of those methods at the first shape: GPU time by kernel family,
                 host time by operation
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlcore.logprobs import completion_logprobs  # noqa: E402
from rlcore.kernels import (apply_kernels, offload_activations, plan_checkpointing, release_host_cache,  # noqa: E402
                            revert_kernels, saved_bytes_per_layer, selective_log_softmax, set_checkpointed_layers)

H100_BF16_DENSE_FLOPS = 989e12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama3_8b_config(layers: int):
    from transformers import LlamaConfig

    from rlcore.tiny_model import LLAMA3_8B_CONFIG

    values = {k: v for k, v in LLAMA3_8B_CONFIG.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return LlamaConfig(**{**values, "num_hidden_layers": layers})


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, rope_theta=500000.0, tie_word_embeddings=False)


def build_model(config, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero B, so the LoRA path is real work
            torch.nn.init.normal_(p, std=1e-3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def flops_per_token(config, trainable: int, length: int) -> float:
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    frozen = layers * per_layer + v * h  # lm_head included, embedding lookup is not a matmul
    return 4 * frozen + 6 * trainable + 6 * layers * length * h


def grpo_like_loss(logp: torch.Tensor, advantages: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """Clipped-ratio loss with old = current (detached), as on the first GRPO iteration."""
    ratio = torch.exp(logp - logp.detach())
    adv = advantages[:, None].expand_as(logp)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv).mean()


def host_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Result:
    method: str
    shape: str
    tokens_per_s: float = float("nan")
    mfu: float = float("nan")
    peak_gib: float = float("nan")
    act_gib: float = float("nan")
    error: str = ""
    note: str = ""


class Runner:
    def __init__(self, model, config, device: torch.device, temperature: float = 0.9) -> None:
        self.model, self.config, self.device, self.temperature = model, config, device, temperature
        base = model.get_base_model()
        self.decoder, self.head = base.model, base.lm_head
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.liger_loss = None

    def step(self, method: str, ids: torch.Tensor, advantages: torch.Tensor) -> float:
        bsz, length = ids.shape
        targets = ids[:, 1:]
        if method in ("ours-ragged", "ours-packed"):
            # rows of different real lengths (right padding), as GRPO completions are; the trainer's log-prob
            # function, padded or packed into one row (padding_free)
            mask = self.ragged_mask
            logp = completion_logprobs(self.model, ids, mask, length - 1, self.temperature,
                                       packed=method == "ours-packed")
            real = mask[:, 1:].float()
            ratio = torch.exp(logp - logp.detach())
            loss = -(ratio * advantages[:, None] * real).sum() / real.sum()
            loss.backward()
            return float(loss.detach())
        method = method.split("-")[0]
        if method == "naive":
            logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1]
            logps = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            logp = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            loss = grpo_like_loss(logp, advantages)
        else:
            hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            if method == "liger":
                out = self.liger_loss(hidden, self.head.weight, targets, torch.ones_like(targets), advantages)
                loss = out[0] if isinstance(out, (tuple, list)) else out
            else:
                logp = selective_log_softmax(hidden.reshape(-1, hidden.shape[-1]), self.head.weight,
                                             targets.reshape(-1), self.temperature).view(bsz, length - 1)
                loss = grpo_like_loss(logp, advantages)
        loss.backward()
        return float(loss.detach())

    def inputs(self, method: str, bsz: int, length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Seeded token ids, advantages and the number of real tokens (ragged rows for ours-ragged/-packed)."""
        gen = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, self.config.vocab_size, (bsz, length), generator=gen).to(self.device)
        adv = torch.randn(bsz, generator=gen).to(self.device)
        if method not in ("ours-ragged", "ours-packed"):
            return ids, adv, bsz * length
        # real lengths uniform in [L/4, L], the same draw for both methods
        lengths = torch.randint(length // 4, length + 1, (bsz,), generator=gen)
        self.ragged_mask = (torch.arange(length)[None, :] < lengths[:, None]).long().to(self.device)
        return ids, adv, int(lengths.sum())

    def configure(self, method: str, bsz: int, length: int, keep_gib: float) -> str:
        """Sets which layers are checkpointed for ``method``'s variant; returns a note for the table."""
        layers = self.config.num_hidden_layers
        if method == "naive-nockpt":
            # an OOM half-way through a step can leave blocks unreleased, skewing every later row: estimate
            # first (saved activations of every layer + the fp32 logits path) and skip what cannot fit
            ids = torch.zeros(bsz, length, dtype=torch.long, device=self.device)
            need = saved_bytes_per_layer(self.model, ids).full * layers + bsz * length * self.config.vocab_size * 10
            if self.device.type == "cuda" and need > torch.cuda.mem_get_info()[0]:
                raise MemoryError(f"skipped: needs ~{need / 2**30:.0f} GiB of activations")
            set_checkpointed_layers(self.model, layers)
            return f"{layers}/{layers} kept"
        if method == "ours-keep":
            ids = torch.zeros(bsz, length, dtype=torch.long, device=self.device)
            memory = saved_bytes_per_layer(self.model, ids)
            left_out = plan_checkpointing(layers, memory, keep_gib * 2**30)
            set_checkpointed_layers(self.model, left_out)
            return f"{left_out}/{layers} kept, {memory.saving / 2**30:.2f} GiB each"
        set_checkpointed_layers(self.model, 0)
        return ""

    def measure(self, method: str, bsz: int, length: int, steps: int, warmup: int, keep_gib: float = 0.0) -> Result:
        shape = f"{bsz}x{length}"
        res = Result(method, shape)
        cuda = self.device.type == "cuda"
        ids, adv, tokens = self.inputs(method, bsz, length)
        offload = method.endswith("-offload")
        if tokens != bsz * length:
            res.note = f"{tokens} real of {bsz * length} tokens"
        try:
            res.note = (res.note + " " + self.configure(method, bsz, length, keep_gib)).strip()

            def run(count: int) -> None:
                for _ in range(count):
                    with offload_activations(enabled=offload):
                        self.step(method, ids, adv)
                    self.model.zero_grad(set_to_none=True)

            run(warmup)
            if cuda:
                torch.cuda.synchronize()
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            run(steps)
            if cuda:
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - start) / steps
            res.tokens_per_s = tokens / elapsed
            res.mfu = res.tokens_per_s * flops_per_token(self.config, self.trainable, length) / H100_BF16_DENSE_FLOPS
            if cuda:
                res.peak_gib = torch.cuda.max_memory_allocated() / 2**30
                res.act_gib = (torch.cuda.max_memory_allocated() - before) / 2**30
        except torch.OutOfMemoryError:
            res.error = "OOM"
        except MemoryError as exc:
            res.error = str(exc)
        except Exception as exc:  # a failing method must not hide the others' numbers
            res.error = f"{type(exc).__name__}: {str(exc)[:120]}"
        finally:
            self.model.zero_grad(set_to_none=True)
            set_checkpointed_layers(self.model, 0)
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
                release_host_cache()
        return res

    def profile(self, method: str, bsz: int, length: int, top: int = 20) -> None:
        """GPU time of one step by kernel and by family (GEMM, attention, Triton, elementwise, copies), and the
        host-side operations that take the most CPU time (launch overhead, pinned allocations)."""
        from torch.profiler import ProfilerActivity, profile

        ids, adv, _ = self.inputs(method, bsz, length)
        offload = method.endswith("-offload")
        self.configure(method, bsz, length, 0.0)
        for profiled in (False, True):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if profiled \
                    else contextlib.nullcontext() as prof:
                with offload_activations(enabled=offload):
                    self.step(method, ids, adv)
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            self.model.zero_grad(set_to_none=True)
        events = prof.key_averages()
        gpu = [e for e in events if e.self_device_time_total > 0]
        total = sum(e.self_device_time_total for e in gpu) or 1.0
        families: dict[str, float] = {}
        for e in gpu:
            name = e.key.lower()
            family = ("attention" if any(k in name for k in ("flash", "fmha", "sdpa", "mem_eff"))
                      else "gemm" if any(k in name for k in ("gemm", "cutlass", "nvjet", "xmma", "matmul"))
                      else "copy" if any(k in name for k in ("memcpy", "memset", "copy"))
                      else "triton" if "_kernel" in name and not name.startswith("void")
                      else "elementwise/other")
            families[family] = families.get(family, 0.0) + e.self_device_time_total
        print(f"\nprofile {method} {bsz}x{length}: GPU busy {total / 1e3:.1f} ms of {wall * 1e3:.1f} ms wall "
              f"(profiled step)")
        for family, t in sorted(families.items(), key=lambda kv: -kv[1]):
            print(f"  {family:18} {t / 1e3:8.1f} ms {t / total:6.1%}")
        for e in sorted(gpu, key=lambda e: -e.self_device_time_total)[:top]:
            print(f"  {e.self_device_time_total / 1e3:8.2f} ms {e.count:6d}x  {e.key[:110]}")
        print("  host side, by self CPU time:")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
            print(f"  {e.self_cpu_time_total / 1e3:8.2f} ms {e.count:6d}x  {e.key[:110]}")
        set_checkpointed_layers(self.model, 0)

    def trains(self, method: str, length: int, offload: bool) -> bool:
        if offload:
            method += "-offload"
            # the checkpoints go to pinned host memory: never ask for more than 70% of what the host has free
            need = self.config.num_hidden_layers * length * self.config.hidden_size * 2
            if need > 0.7 * host_available_bytes():
                print(f"    {length}: skipped, {need / 2**30:.0f} GiB of pinned host memory needed", flush=True)
                return False
        t0 = time.perf_counter()
        res = self.measure(method, 1, length, steps=1, warmup=0)
        print(f"    {method} {length}: {res.error or 'ok'} ({time.perf_counter() - t0:.0f}s, "
              f"peak {res.peak_gib:.1f} GiB)", flush=True)
        return not res.error

    def longest(self, method: str, offload: bool, start: int, limit: int, budget_s: float,
                growth: float = 1.25) -> tuple[int, int | None]:
        """(largest length that trained, smallest that failed or None): tries start, start·growth, … (multiples
        of 1024) until one fails, ``limit`` is passed or ``budget_s`` is spent. Steps at 100k+ tokens take
        tens of seconds (attention is quadratic), hence a geometric walk instead of a bisection."""
        t0 = time.perf_counter()
        good, length = 0, start
        while length <= limit and time.perf_counter() - t0 < budget_s:
            if not self.trains(method, length, offload):
                return good, length
            good = length
            length = int(length * growth) // 1024 * 1024
        return good, None


def enable_method(method: str, runner: Runner) -> str | None:
    """Puts the model in ``method``'s configuration; returns why it cannot run, if it cannot."""
    revert_kernels(runner.model)
    method = method.split("-")[0]
    if method == "ours":
        apply_kernels(runner.model, rope=True, swiglu=True, rmsnorm=True, lora=True)
    elif method == "liger":
        if runner.device.type != "cuda":
            return "needs CUDA"
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except Exception as exc:
            return f"liger-kernel not importable ({type(exc).__name__})"
        # patches the modeling module globally and this model's modules: irreversible, so liger runs last
        apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=runner.model.get_base_model())
        runner.liger_loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=False,
                                                     loss_type="grpo", temperature=runner.temperature)
    return None


def print_table(results: list[Result], baseline: str = "naive") -> None:
    by_shape: dict[str, Result] = {r.shape: r for r in results if r.method == baseline and not r.error}
    print(f"\n{'method':12} {'shape':10} {'tok/s':>9} {'x naive':>8} {'MFU':>6} {'peak GiB':>9} {'act GiB':>8} "
          f"{'peak/naive':>10}  note")
    for r in results:
        base = by_shape.get(r.shape)
        if r.error:
            print(f"{r.method:12} {r.shape:10} {r.error}")
            continue
        speed = r.tokens_per_s / base.tokens_per_s if base else float("nan")
        mem = r.peak_gib / base.peak_gib if base and not math.isnan(base.peak_gib) else float("nan")
        print(f"{r.method:12} {r.shape:10} {r.tokens_per_s:9.0f} {speed:8.2f} {r.mfu:6.1%} {r.peak_gib:9.2f} "
              f"{r.act_gib:8.2f} {mem:10.2f}  {r.note}")


def bench_logprobs(device: torch.device, n: int, hidden: int, vocab: int, dtype: torch.dtype, steps: int) -> None:
    """The head alone: selective_log_softmax with the Triton row kernels vs the PyTorch chunked rows vs the
    naive full-logits path, forward + backward, frozen weight."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    h0 = torch.randn(n, hidden, generator=gen).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device, dtype)
    ids = torch.randint(0, vocab, (n,), generator=gen).to(device)
    g = torch.randn(n, generator=gen).to(device)
    print(f"\nlog-prob head alone: N={n} H={hidden} V={vocab} {dtype}")
    for name in ("triton", "torch", "naive"):
        if name == "triton" and device.type != "cuda":
            continue
        try:
            for i in range(steps + 1):
                if i == 1:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                h = h0.clone().requires_grad_()
                if name == "naive":
                    logits = (h @ w.t()).float()
                    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)
                else:
                    logp = selective_log_softmax(h, w, ids, backend=name)
                (logp * g).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / steps * 1e3
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            print(f"  {name:7} {ms:8.2f} ms  peak {peak:6.2f} GiB")
        except torch.OutOfMemoryError:
            print(f"  {name:7} OOM")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B config (32 = full)")
    parser.add_argument("--quick", action="store_true", help="8x640 and 16x640 only, fewer steps")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (or wherever), checks the script")
    parser.add_argument("--methods", default="naive,ours,liger",
                        help="comma list of naive, naive-nockpt, ours, ours-keep, ours-offload, liger (liger runs last)")
    parser.add_argument("--shapes", default=None, help="comma list of BxL, default 8x640,16x640,1x8192")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--keep-gib", type=float, default=40.0,
                        help="ours-keep: GiB the saved activations of layers left out of checkpointing may take")
    parser.add_argument("--profile", default="", help="comma list of methods to profile at the first shape")
    parser.add_argument("--longest", default="", help="comma list of ours, ours-offload, naive: search the "
                        "longest single completion that trains")
    parser.add_argument("--longest-start", type=int, default=8192)
    parser.add_argument("--longest-budget", type=float, default=150.0, help="seconds per search")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    if args.smoke:
        device, dtype, config = torch.device("cpu"), torch.float32, tiny_config()
        shapes = [(2, 16), (1, 32)]
        steps, warmup = 1, 1
    else:
        if not torch.cuda.is_available():
            print("needs a CUDA GPU (use --smoke on CPU)", file=sys.stderr)
            return 2
        device, dtype, config = torch.device("cuda"), torch.bfloat16, llama3_8b_config(args.layers)
        shapes = [(8, 640), (16, 640)] + ([] if args.quick else [(1, 8192)])
        steps, warmup = (2, 1) if args.quick else (3, 1)
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    steps = args.steps or steps
    known = ("naive", "naive-nockpt", "ours", "ours-keep", "ours-offload", "ours-ragged", "ours-packed", "liger")
    asked = [m for m in args.methods.split(",") if m]
    unknown = [m for m in asked + [m for m in args.longest.split(",") if m] if m not in known]
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    # liger patches irreversibly: last; naive-nockpt (the most memory) just before it
    methods = sorted(asked, key=lambda m: (m == "liger", m == "naive-nockpt"))
    searches = [m for m in args.longest.split(",") if m]

    model = build_model(config, device, dtype)
    runner = Runner(model, config, device)
    print(f"device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} layers={config.num_hidden_layers} "
          f"dtype={dtype} trainable={runner.trainable:,} torch={torch.__version__} "
          f"setup={time.perf_counter() - t_start:.0f}s", flush=True)

    results: list[Result] = []
    longest: list[tuple[str, int, int | None]] = []
    enabled = None
    for method in methods + [m for m in searches if m not in methods]:
        base = method.split("-")[0]
        if base != enabled:
            why = enable_method(method, runner)
            enabled = base
            if why:
                results.extend(Result(method, f"{b}x{l}", error=f"skipped: {why}") for b, l in shapes)
                continue
        if method in methods:
            if method in args.profile.split(",") and device.type == "cuda":
                runner.profile(method, *shapes[0])
            for bsz, length in shapes:
                r = runner.measure(method, bsz, length, steps, warmup, keep_gib=args.keep_gib)
                results.append(r)
                held = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                print(f"  {r.method:12} {r.shape:10} {r.tokens_per_s:8.0f} tok/s peak {r.peak_gib:6.2f} GiB "
                      f"{r.note} {r.error} (held after: {held:.2f} GiB)", flush=True)
        if method in searches and not args.smoke:
            good, bad = runner.longest(base, method.endswith("offload"), start=args.longest_start, limit=1 << 20,
                                       budget_s=args.longest_budget)
            longest.append((method, good, bad))
            print(f"  longest {method}: {good} (first failure: {bad})", flush=True)
    print_table(results)
    del model, runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        bench_logprobs(device, 16 * 640, config.hidden_size, config.vocab_size, dtype, steps=3)
    else:
        bench_logprobs(device, 64, config.hidden_size, config.vocab_size, dtype, steps=1)
    if longest:
        print("\nlongest single completion that trains (multiple of 1024; 0 = not even the start length):")
        for method, good, bad in longest:
            print(f"  {method:12} trained {good}, " + (f"failed at {bad}" if bad else "no failure before the budget"))
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
