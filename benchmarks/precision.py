"""bf16 vs fp16 vs float8 weights at Llama-3-8B shapes, one shared copy in vLLM and the LoRA trainer.

Per dtype: the memory the weights take, rollout tokens/s (VLLMEngine and raw ``LLM.generate``, LoRA active),
training tokens/s (one policy forward+backward), the whole RL step, and the longest completion that trains;
then one table with each dtype's ratio to bf16. vLLM fills random weights of Llama-3-8B's shapes
(``load_format="dummy"``; only config.json is written); LoRA r=16 on the 7 projections; the trainer runs as
``rlcore.model.load_policy`` sets it up (shared weights, rlcore kernels, gradient checkpointing; fp16 with the
float32 residual stream and dynamic loss scaling).

Each dtype runs in its own process (vLLM's memory allocator is one per process) and writes
``precision_<dtype>.json`` after every phase, so a crash or a timeout keeps what was measured. ::

    python benchmarks/precision.py --quick            # all 3 dtypes, essential rows: ~5 min on an H200
    python benchmarks/precision.py --dtypes bf16      # full set for one dtype (~6 min with compile + graphs)
    python benchmarks/precision.py --dtypes float8 --phases memory,train     # some phases of one engine
    python benchmarks/precision.py --table-only --out-dir DIR                # the table from saved JSON (CPU)

Phases (``--phases``): ``memory`` (weight bytes in vLLM and in the trainer, bytes allocated by sharing, KV
cache), ``rollout`` (generation tok/s at each ``--rollout-batches``), ``train`` (fwd+bwd tok/s at
``--train-batch`` × (prompt + ``--train-len``) tokens, KV cache released), ``step`` (wake → generate →
standby → train every completion → AdamW → LoRA sync, ``--step-repeats`` times, the last one reported),
``longest`` (peak training memory at ``--longest-probes`` completion lengths, batch 1, KV released; a fit
predicts the longest completion that fits, then up to ``--longest-tries`` runs bracket it), ``maxbatch``
(one whole step at the largest generation batch the KV cache holds; not in the defaults).

vLLM modes (``--vllm-mode``): ``compiled`` (vLLM's default: torch.compile + CUDA graphs, ~2 min to start),
``graphs`` (no compile, full CUDA graphs for decode at the batch sizes used; ~30 s; falls back to ``eager``
if vLLM refuses it), ``eager`` (no graphs: decode is launch-bound, so rollout ratios understate FP8).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 2**30
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "float8": "float8"}
PHASES = ("memory", "rollout", "train", "step", "longest", "maxbatch")
VLLM_MODES = ("compiled", "graphs", "eager")
ENGINE_INIT_FAILED = 3  # exit code of a child whose vLLM engine did not start
PHASE_FAILED = 4  # exit code of a child whose engine started and a phase then failed (JSON says which)

# Settings left unset on the command line take these values (--quick: the second column).
FULL = dict(phases="memory,rollout,train,step,longest", vllm_mode="compiled", rollout_batches="64,256",
            rollout_len=512, train_batch=8, train_len=512, train_repeats=3, step_prompts=32, step_len=512,
            step_repeats=2, longest_probes="4096,16384,32768", longest_tries=1, max_model_len=4096,
            child_timeout=1800)
QUICK = dict(phases="memory,rollout,train,step,longest", vllm_mode="graphs", rollout_batches="128",
             rollout_len=256, train_batch=8, train_len=512, train_repeats=2, step_prompts=8, step_len=256,
             step_repeats=2, longest_probes="2048,8192,16384", longest_tries=0, max_model_len=1024,
             child_timeout=240)


# ---------------------------------------------------------------------- arguments (pure, CPU-tested)
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="essential rows, small shapes, no compile")
    parser.add_argument("--dtypes", default="bf16,fp16,float8", help="comma list of " + ", ".join(DTYPES))
    parser.add_argument("--phases", default=None, help="comma list of " + ", ".join(PHASES))
    parser.add_argument("--vllm-mode", default=None, choices=VLLM_MODES)
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smoke runs)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt in a step")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per forward+backward in a step")
    parser.add_argument("--rollout-batches", default=None, help="comma list of sequence counts")
    parser.add_argument("--rollout-len", type=int, default=None)
    parser.add_argument("--train-batch", type=int, default=None)
    parser.add_argument("--train-len", type=int, default=None, help="completion tokens per training sequence")
    parser.add_argument("--train-repeats", type=int, default=None, help="forward+backward runs; the first warms up")
    parser.add_argument("--step-prompts", type=int, default=None)
    parser.add_argument("--step-len", type=int, default=None)
    parser.add_argument("--step-repeats", type=int, default=None, help="RL steps; the last one is reported")
    parser.add_argument("--longest-probes", default=None, help="completion lengths whose peak memory is measured")
    parser.add_argument("--longest-tries", type=int, default=None, help="runs that check the prediction (0: none)")
    parser.add_argument("--maxbatch-cap", type=int, default=1024, help="most sequences in the maxbatch step")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="vLLM max_num_seqs (maxbatch needs more)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--fp8-grad-mode", default="dequant", choices=["fp8", "dequant"],
                        help="FP8 backward: FP8 GEMM through a transient transposed copy, or a dequantized bf16 one")
    parser.add_argument("--child-timeout", type=int, default=None, help="seconds per dtype process")
    parser.add_argument("--out-dir", default=None, help="JSON goes here (default: $OUT or .)")
    parser.add_argument("--table-only", action="store_true", help="print the table from the JSON in --out-dir")
    parser.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    return resolve_settings(parser.parse_args(argv), parser)


def _int_list(text: str, name: str, parser: argparse.ArgumentParser | None = None) -> list[int]:
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        message = f"--{name.replace('_', '-')} must be a comma list of positive integers, got {text!r}"
        if parser is not None:
            parser.error(message)
        raise ValueError(message)
    return values


def resolve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Fills unset options from :data:`QUICK` or :data:`FULL` and checks the lists (clear errors)."""
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out_dir is None:
        args.out_dir = os.environ.get("OUT", ".")

    def fail(message: str) -> None:
        if parser is not None:
            parser.error(message)
        raise ValueError(message)

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if not dtypes or unknown:
        fail(f"--dtypes: unknown {unknown or dtypes}; expected a comma list of {', '.join(DTYPES)}")
    args.dtype_list = dtypes
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if not phases or unknown:
        fail(f"--phases: unknown {unknown or phases}; expected a comma list of {', '.join(PHASES)}")
    args.phase_list = phases
    args.rollout_batch_list = _int_list(args.rollout_batches, "rollout_batches", parser)
    args.longest_probe_list = sorted(set(_int_list(args.longest_probes, "longest_probes", parser)))
    if "longest" in phases and len(args.longest_probe_list) < 2:
        fail("--longest-probes needs at least two lengths to fit the memory per token")
    for name in ("rollout_len", "train_batch", "train_len", "train_repeats", "step_prompts", "step_len",
                 "step_repeats", "generations", "micro_batch", "prompt_len", "max_model_len"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    longest_generation = args.prompt_len + max(args.rollout_len, args.step_len)
    if longest_generation > args.max_model_len:
        fail(f"--max-model-len {args.max_model_len} is shorter than prompt + completion ({longest_generation})")
    return args


def capture_sizes(args: argparse.Namespace) -> list[int]:
    """Decode batch sizes to capture CUDA graphs for in ``graphs`` mode: every batch the phases run."""
    sizes = {1, 8, *args.rollout_batch_list, args.step_prompts * args.generations}
    if args.max_num_seqs:
        sizes = {s for s in sizes if s <= args.max_num_seqs}
    return sorted(sizes)


# ---------------------------------------------------------------------- arithmetic (pure, CPU-tested)
def ratio(value: Any, base: Any) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or not base:
        return None
    return float(value) / float(base)


def predict_longest(probes: list[tuple[int, float]], budget_bytes: float, margin: float = 0.97) -> int | None:
    """The completion length whose training peak reaches ``margin × budget_bytes``, from (length, peak bytes)
    probes: ``peak = a + b·L + c·L²`` through the last three probes when it curves upward (a [L × L] tensor
    somewhere), else the straight line through the last two. None when memory does not grow with length."""
    points = sorted(probes)
    if len(points) < 2:
        return None
    target = margin * budget_bytes
    (l1, p1), (l2, p2) = points[-2], points[-1]
    slope = (p2 - p1) / (l2 - l1)
    if len(points) >= 3:
        (l0, p0) = points[-3]
        s01 = (p1 - p0) / (l1 - l0)
        curvature = (slope - s01) / (l2 - l0)
        # only when clearly quadratic: allocator rounding makes small curvatures noise
        if curvature > 0 and curvature * (l2 - l0) > 0.25 * max(s01, 1e-9):
            b = s01 - curvature * (l0 + l1)
            a = p0 - b * l0 - curvature * l0 * l0
            disc = b * b - 4 * curvature * (a - target)
            if disc < 0:
                return None
            return int((-b + math.sqrt(disc)) / (2 * curvature))
    if slope <= 0:
        return None
    return int(l2 + (target - p2) / slope)


def next_try(tried: dict[int, bool], predicted: int, step_fraction: float = 0.04, granule: int = 1024) -> int | None:
    """The next length to run when bracketing the longest one that fits: start a step under the prediction,
    go up while it fits, down while it does not; None once a fitting length has a failing one a step above."""
    step = max(granule, int(predicted * step_fraction) // granule * granule)
    if not tried:
        return max(granule, (predicted - step) // granule * granule)
    fitting = [length for length, ok in tried.items() if ok]
    failing = [length for length, ok in tried.items() if not ok]
    if fitting and failing and min(failing) - max(fitting) <= step:
        return None
    if not fitting:
        candidate = min(failing) - step
        return candidate if candidate >= granule else None
    candidate = max(fitting) + step
    return candidate if not failing or candidate < min(failing) else None


def longest_summary(result: dict[str, Any]) -> tuple[Any, str]:
    """(value, how) for the table: the largest length that trained in the runs that checked the prediction
    ("measured", or "measured, ≥" when nothing above it was seen to fail), else the prediction ("est.")."""
    longest = result.get("longest") or {}
    checks = {int(k): v for k, v in (longest.get("checks") or {}).items()}
    fitting = [length for length, ok in checks.items() if ok]
    if fitting:
        failing = [length for length, ok in checks.items() if not ok and length > max(fitting)]
        return max(fitting), ("measured" if failing else "measured, ≥")
    if longest.get("predicted") is not None:
        return longest["predicted"], "est." if not checks else f"est.; {min(checks):,} did not fit"
    if longest.get("probe_oom") is not None:
        return f"< {int(longest['probe_oom']):,}", "a probe did not fit"
    return None, ""


# ---------------------------------------------------------------------- table (pure, CPU-tested)
def _get(result: dict[str, Any], *path: str) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def table_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(label, dtype → value) for every quantity measured in at least one result."""
    rows: list[tuple[str, dict[str, Any]]] = []

    def add(label: str, *path: str, scale: float = 1.0) -> None:
        values = {}
        for dtype, result in results.items():
            value = _get(result, *path)
            values[dtype] = value * scale if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if any(v is not None for v in values.values()):
            rows.append((label, values))

    add("vLLM mode", "vllm_mode")
    add("vLLM engine start (s)", "init", "seconds")
    add("weights held by vLLM (GiB)", "memory", "vllm_weight_bytes", scale=1 / GIB)
    add("trainer's frozen weights (GiB, views)", "memory", "trainer_weight_bytes", scale=1 / GIB)
    add("bytes allocated by sharing", "memory", "allocated_by_sharing")
    add("trainer parameters that are vLLM's storage", "memory", "shared_fraction")
    add("KV cache tokens (utilization 0.9)", "memory", "kv_cache_tokens")
    batches = sorted({int(n) for r in results.values() for n in (_get(r, "rollout") or {})})
    for n in batches:
        add(f"rollout tok/s, {n} seqs (VLLMEngine)", "rollout", str(n), "engine_tok_s")
        add(f"rollout tok/s, {n} seqs (raw LLM.generate)", "rollout", str(n), "raw_tok_s")
        add(f"rollout engine / raw, {n} seqs", "rollout", str(n), "engine_over_raw")
    add("train tok/s (fwd+bwd)", "train", "tok_s")
    add("  FP8 backward as an FP8 GEMM (transient transposed copy)", "train", "tok_s_grad_fp8")
    add("  FP8 backward as a bf16 GEMM (transient dequantized copy)", "train", "tok_s_grad_dequant")
    add("train peak above start (GiB)", "train", "peak_above_start_bytes", scale=1 / GIB)
    add("RL step s", "step", "step_s")
    add("RL step: generate s", "step", "generate_s")
    add("RL step: train s", "step", "train_s")
    add("RL step tok/s (completion tokens / step)", "step", "step_tok_s")
    add("train/inference mean |Δlogp| (dummy weights)", "step", "mismatch_logp_diff_mean")
    add("maxbatch: sequences (largest generation batch the KV cache holds)", "maxbatch", "sequences")
    add("maxbatch: RL step s", "maxbatch", "step_s")
    add("maxbatch: generate s", "maxbatch", "generate_s")
    add("maxbatch: train s", "maxbatch", "train_s")
    add("maxbatch: generation tok/s", "maxbatch", "generate_tok_s")
    add("maxbatch: RL step tok/s", "maxbatch", "step_tok_s")
    longest = {dtype: longest_summary(result) for dtype, result in results.items()}
    if any(value is not None for value, _ in longest.values()):
        rows.append(("longest completion that trains", {d: v for d, (v, _) in longest.items()}))
        rows.append(("  (how)", {d: how for d, (_, how) in longest.items()}))
    errors = {d: str(r["error"])[:80] for d, r in results.items() if r.get("error")}
    if errors:
        rows.append(("error (see the log)", errors))
    return rows


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 100):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def format_table(results: dict[str, dict[str, Any]], base: str = "bf16") -> str:
    """Markdown: one row per quantity, a column per dtype, then each other dtype over ``base``."""
    dtypes = [d for d in DTYPES if d in results]
    others = [d for d in dtypes if d != base] if base in results else []
    header = ["quantity", *dtypes, *[f"{d} / {base}" for d in others]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label, values in table_rows(results):
        cells = [label, *[_format(values.get(d)) for d in dtypes]]
        for d in others:
            r = ratio(values.get(d), values.get(base))
            cells.append("–" if r is None else f"{r:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_results(out_dir: str) -> dict[str, dict[str, Any]]:
    results = {}
    for dtype in DTYPES:
        path = os.path.join(out_dir, f"precision_{dtype}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                results[dtype] = json.load(handle)
    return results


# ---------------------------------------------------------------------- parent: one process per dtype
def run_parent(args: argparse.Namespace) -> int:
    os.makedirs(args.out_dir, exist_ok=True)
    status = 0
    for dtype in args.dtype_list:
        mode = args.vllm_mode
        while True:
            config = dict(vars(args), dtype=dtype, vllm_mode=mode)
            config_path = os.path.join(args.out_dir, f"precision_args_{dtype}.json")
            with open(config_path, "w", encoding="utf-8") as handle:
                json.dump(config, handle, indent=2)
            start = time.perf_counter()
            print(f"=== {dtype}: vLLM mode {mode}, phases {','.join(args.phase_list)}", flush=True)
            try:
                code = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-config", config_path],
                                      timeout=args.child_timeout, check=False).returncode
            except subprocess.TimeoutExpired:
                code = 124
                print(f"=== {dtype}: stopped after {args.child_timeout} s (--child-timeout); JSON keeps the phases "
                      "that finished", flush=True)
            print(f"=== {dtype}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
            if code == ENGINE_INIT_FAILED and mode == "graphs":
                mode = args.vllm_mode = "eager"  # and for the dtypes after this one
                print(f"=== {dtype}: vLLM did not start in graphs mode; again in eager mode", flush=True)
                continue
            status = status or code
            break
    results = load_results(args.out_dir)
    print()
    print(format_table(results))
    with open(os.path.join(args.out_dir, "precision_table.md"), "w", encoding="utf-8") as handle:
        handle.write(format_table(results) + "\n")
    return status


# ---------------------------------------------------------------------- child: one dtype on the GPU


def _dummy_model_dir(layers: int | None) -> str:
    from rlcore.tiny_model import write_llama3_8b_dummy_dir

    return write_llama3_8b_dummy_dir(layers=layers, with_tokenizer=False)


class _Child:
    """Engine, shared policy and optimizer of one dtype, and the phases measured on them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.path = os.path.join(args.out_dir, f"precision_{args.dtype}.json")
        self.result: dict[str, Any] = {"dtype": args.dtype, "vllm_mode": args.vllm_mode, "args": {
            k: v for k, v in vars(args).items() if k not in ("child_config",)}, "date": time.strftime("%Y-%m-%d %H:%M")}

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self.result, handle, indent=2, default=str)
        os.replace(tmp, self.path)

    # .................................................................. setup
    def start(self) -> None:
        import torch

        from rlcore.config import GRPOConfig, ModelConfig
        from rlcore.vllm_engine import VLLMEngine

        args = self.args
        import vllm

        self.result.update(vllm=vllm.__version__, torch=torch.__version__, device=torch.cuda.get_device_name())
        path = _dummy_model_dir(args.layers)
        model_config = ModelConfig(model_name_or_path=path, dtype=DTYPES[args.dtype], lora_r=args.lora_r,
                                   lora_alpha=args.lora_alpha, gpu_memory_utilization=args.gpu_memory_utilization,
                                   enforce_eager=args.vllm_mode == "eager", max_seq_length=args.max_model_len,
                                   target_modules=TARGETS)
        llm_kwargs: dict[str, Any] = {}
        if args.max_num_seqs:
            llm_kwargs["max_num_seqs"] = args.max_num_seqs
        if args.vllm_mode == "graphs":
            # no torch.compile; full CUDA graphs for decode steps, captured only at the batch sizes used
            llm_kwargs["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                                "cudagraph_capture_sizes": capture_sizes(args)}
        self.engine = VLLMEngine(model_config, GRPOConfig(seed=0), load_format="dummy", ignore_eos=True,
                                 **llm_kwargs)
        self.vocab = self.engine.hf_config().vocab_size
        self.result["init"] = {"seconds": self.engine.init_seconds, "kv_cache_tokens": self.engine.kv_cache_tokens,
                               "llm_kwargs": llm_kwargs}
        print(f"[{args.dtype}] engine ready in {self.engine.init_seconds:.1f} s, KV cache "
              f"{self.engine.kv_cache_tokens} tokens", flush=True)
        self.save()

    def build_policy(self) -> None:
        import torch
        from peft import LoraConfig, get_peft_model

        from rlcore.fp8_weights import set_fp8_options
        from rlcore.kernels import apply_kernels
        from rlcore.kernels.fp16_stability import DynamicLossScaler
        from rlcore.kernels.fp8_linear import FP8Linear
        from rlcore.shared_weights import shared_fraction

        args, engine = self.args, self.engine
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        base = engine.build_shared_model()
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
        source = engine.vllm_model
        storages, vllm_bytes = set(), 0
        for parameter in source.parameters():
            if parameter.data_ptr() not in storages:
                storages.add(parameter.data_ptr())
                vllm_bytes += parameter.numel() * parameter.element_size()
        shared, total = shared_fraction(base, source)
        fp8_layers = sum(isinstance(m, FP8Linear) for m in base.modules())
        if fp8_layers:
            set_fp8_options(base, grad_mode=args.fp8_grad_mode)
        self.result["memory"] = {
            "vllm_weight_bytes": vllm_bytes,
            "trainer_weight_bytes": sum(p.numel() * p.element_size() for p in base.parameters()),
            "allocated_by_sharing": grown, "shared_params": shared, "params": total,
            "shared_fraction": f"{shared}/{total}", "fp8_layers": fp8_layers,
            "kv_cache_tokens": engine.kv_cache_tokens,
            "device_used_gib": (torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]) / GIB}
        print(f"[{args.dtype}] memory: " + ", ".join(f"{k}={v}" for k, v in self.result["memory"].items()),
              flush=True)
        self.save()
        policy = get_peft_model(base, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                 target_modules=TARGETS))
        with torch.no_grad():  # a non-zero B, so the adapter is part of every product
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 1e-3)
        engine.attach_policy(policy)
        policy.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.get_base_model().config.use_cache = False
        self.result["kernels"] = apply_kernels(policy, lora=True)
        policy.train()
        self.policy = policy
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-6)
        self.scaler = DynamicLossScaler() if args.dtype == "fp16" else None

    # .................................................................. training pieces
    def backward(self, ids, completion_len: int, old, advantages, tokens_in_step: int) -> float:
        """GRPO clipped loss on the completion's per-token log-probs, backward; returns mean |logp − old|."""
        import torch

        from rlcore.logprobs import completion_logprobs

        logps = completion_logprobs(self.policy, ids, torch.ones_like(ids), completion_len).float()
        ratio_ = torch.exp(logps - old)
        adv = advantages[:, None]
        loss = -torch.minimum(ratio_ * adv, ratio_.clamp(0.8, 1.2) * adv).sum() / tokens_in_step
        (self.scaler.scale_loss(loss) if self.scaler is not None else loss).backward()
        return float((logps.detach() - old).abs().mean())

    def optimizer_step(self) -> bool:
        import torch

        finite = self.scaler.unscale_(self.params) if self.scaler is not None else True
        if finite:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update(finite)
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def prompts(self, count: int, seed: int) -> list[list[int]]:
        import torch

        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab, (count, self.args.prompt_len), generator=generator).tolist()

    # .................................................................. phases
    def phase_rollout(self) -> None:
        import torch

        from rlcore.rollout import SamplingSettings

        args, engine = self.args, self.engine
        settings = SamplingSettings(max_tokens=args.rollout_len, temperature=1.0)
        engine.generate(self.prompts(8, 99), SamplingSettings(max_tokens=16, temperature=1.0))  # warm-up
        self.result["rollout"] = {}
        for n in args.rollout_batch_list:
            # different prompts for the two runs: the second must not find the first one's prefix cache
            prompts, raw_prompts = self.prompts(n, 2 * n), self.prompts(n, 2 * n + 1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            rollouts = engine.generate(prompts, settings)
            engine_s = time.perf_counter() - start
            tokens = sum(len(r.completion_ids) for r in rollouts)
            params = [engine.sampling_params(settings, i) for i in range(n)]
            torch.cuda.synchronize()
            start = time.perf_counter()
            outputs = engine.llm.generate([{"prompt_token_ids": p} for p in raw_prompts], params, use_tqdm=False,
                                          lora_request=engine.lora_request)
            raw_s = time.perf_counter() - start
            raw_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            row = {"tokens": tokens, "engine_s": engine_s, "engine_tok_s": tokens / engine_s,
                   "raw_s": raw_s, "raw_tok_s": raw_tokens / raw_s}
            row["engine_over_raw"] = row["engine_tok_s"] / row["raw_tok_s"]
            self.result["rollout"][str(n)] = row
            print(f"[{args.dtype}] rollout {n} seqs: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()),
                  flush=True)
            self.save()

    def _time_backward(self, ids, completion_len: int, old, advantages) -> tuple[float, list[float]]:
        """Mean seconds of one forward+backward over the timed runs (the first of ``train_repeats`` warms up)."""
        import torch

        times = []
        for _ in range(self.args.train_repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            self.backward(ids, completion_len, old, advantages, ids.shape[0] * completion_len)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            self.optimizer.zero_grad(set_to_none=True)
        timed = times[1:] or times
        return sum(timed) / len(timed), times

    def phase_train(self) -> None:
        import torch

        from rlcore.fp8_weights import set_fp8_options

        args = self.args
        self.engine.sleep()
        batch, length = args.train_batch, args.prompt_len + args.train_len
        generator = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, self.vocab, (batch, length), device="cuda", generator=generator)
        old = torch.full((batch, args.train_len), -math.log(self.vocab), device="cuda")
        advantages = torch.randn(batch, device="cuda", generator=generator)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
        seconds, times = self._time_backward(ids, args.train_len, old, advantages)
        row = {"tokens": batch * length, "seconds": seconds, "tok_s": batch * length / seconds, "all_seconds": times,
               "peak_above_start_bytes": torch.cuda.max_memory_allocated() - start_bytes}
        if self.result["memory"].get("fp8_layers"):
            # the other way through the FP8 weight in backward (module docstring of rlcore.kernels.fp8_linear)
            other = "dequant" if args.fp8_grad_mode == "fp8" else "fp8"
            set_fp8_options(self.policy, grad_mode=other)
            other_seconds, _ = self._time_backward(ids, args.train_len, old, advantages)
            set_fp8_options(self.policy, grad_mode=args.fp8_grad_mode)
            row[f"tok_s_grad_{other}"] = batch * length / other_seconds
            row[f"tok_s_grad_{args.fp8_grad_mode}"] = row["tok_s"]
        self.result["train"] = row
        print(f"[{args.dtype}] train {batch}x{length}: " + ", ".join(
            f"{k}={v:,.0f}" for k, v in row.items() if k.startswith("tok_s")), flush=True)
        self.save()

    def rl_step(self, num_prompts: int, completion_len: int, seed: int) -> dict[str, Any]:
        import torch

        from rlcore.rollout import SamplingSettings

        args, engine = self.args, self.engine
        row: dict[str, Any] = {}
        torch.cuda.synchronize()
        step_start = time.perf_counter()
        row["wake_s"] = engine.wake().seconds
        prompts = [p for p in self.prompts(num_prompts, seed) for _ in range(args.generations)]
        start = time.perf_counter()
        rollouts = engine.generate(prompts, SamplingSettings(max_tokens=completion_len, temperature=1.0))
        row["generate_s"] = time.perf_counter() - start
        sleep = engine.sleep()
        row["sleep_s"], row["freed_gib"] = sleep.seconds, sleep.freed_gib
        start = time.perf_counter()
        rewards = torch.randn(len(rollouts)).view(-1, args.generations)
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
        tokens = sum(len(r.completion_ids) for r in rollouts)
        mismatch = []
        for first in range(0, len(rollouts), args.micro_batch):
            group = rollouts[first:first + args.micro_batch]
            ids = torch.tensor([r.prompt_ids + r.completion_ids for r in group], device="cuda")
            old = torch.tensor([r.logprobs for r in group], device="cuda")
            mismatch.append(self.backward(ids, completion_len, old, advantages[first:first + len(group)].cuda(),
                                          tokens))
        row["update_applied"] = self.optimizer_step()
        torch.cuda.synchronize()
        row["train_s"] = time.perf_counter() - start
        row["sync_s"] = engine.sync_weights().seconds
        row["step_s"] = time.perf_counter() - step_start
        row["completion_tokens"] = tokens
        row["sequences"] = len(rollouts)
        row["step_tok_s"] = tokens / row["step_s"]
        row["generate_tok_s"] = tokens / row["generate_s"]
        row["mismatch_logp_diff_mean"] = sum(mismatch) / len(mismatch)
        if self.scaler is not None:
            row["loss_scale"] = self.scaler.scale
        return row

    def phase_step(self) -> None:
        args = self.args
        rows = [self.rl_step(args.step_prompts, args.step_len, seed=1000 + i) for i in range(args.step_repeats)]
        for i, row in enumerate(rows):
            print(f"[{args.dtype}] step {i}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in row.items()), flush=True)
        self.result["step"] = dict(rows[-1], all_step_s=[r["step_s"] for r in rows])
        self.save()

    def phase_maxbatch(self) -> None:
        args = self.args
        kv = self.engine.kv_cache_tokens or 0
        # 2% of the cache left free: a batch that fills it exactly would have vLLM preempt and recompute sequences
        # (cache blocks are allocated per 16 tokens), which measures the scheduler, not the dtype
        sequences = min(args.maxbatch_cap, int(kv * 0.98) // (args.prompt_len + args.step_len))
        sequences = sequences // args.generations * args.generations
        if sequences < args.generations:
            self.result["maxbatch"] = {"skipped": f"KV cache of {kv} tokens holds fewer than one group"}
        else:
            row = self.rl_step(sequences // args.generations, args.step_len, seed=5000)
            self.result["maxbatch"] = row
            print(f"[{args.dtype}] maxbatch {sequences} seqs: {row['step_tok_s']:,.0f} tok/s per step", flush=True)
        self.save()

    def _fits(self, completion_len: int) -> tuple[bool, int]:
        """One forward+backward of one sequence; (fits, peak bytes above the start)."""
        import torch

        args = self.args
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
        ok = True
        try:
            ids = torch.randint(0, self.vocab, (1, args.prompt_len + completion_len), device="cuda")
            old = torch.full((1, completion_len), -math.log(self.vocab), device="cuda")
            self.backward(ids, completion_len, old, torch.ones(1, device="cuda"), completion_len)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            ok = False
        except RuntimeError as error:  # an allocation failing inside a Triton / cuBLAS call
            if "out of memory" not in str(error).lower():
                raise
            ok = False
        peak = torch.cuda.max_memory_allocated() - start_bytes
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return ok, peak

    def phase_longest(self) -> None:
        import torch

        args = self.args
        self.engine.sleep()
        gc.collect()
        torch.cuda.empty_cache()
        budget = torch.cuda.mem_get_info()[0]
        probes: list[tuple[int, int]] = []
        checks: dict[int, bool] = {}
        record: dict[str, Any] = {"budget_bytes": budget, "probes": probes, "checks": checks}
        self.result["longest"] = record
        for length in args.longest_probe_list:
            start = time.perf_counter()
            ok, peak = self._fits(length)
            print(f"[{args.dtype}] probe {length}: {'fits' if ok else 'OOM'}, peak {peak / GIB:.2f} GiB "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            if not ok:
                record["probe_oom"] = length
                break
            probes.append((length, peak))
        record["predicted"] = predict_longest(probes, budget)
        print(f"[{args.dtype}] predicted longest completion: {record['predicted']}", flush=True)
        self.save()
        if record["predicted"] is None:
            return
        for _ in range(args.longest_tries):
            length = next_try(checks, record["predicted"])
            if length is None:
                break
            start = time.perf_counter()
            ok, _ = self._fits(length)
            checks[length] = ok
            print(f"[{args.dtype}] try {length}: {'fits' if ok else 'OOM'} ({time.perf_counter() - start:.1f} s)",
                  flush=True)
            self.save()

    def run(self) -> int:
        try:
            self.start()
        except Exception as error:  # noqa: BLE001 - reported to the parent, which may retry in eager mode
            import traceback

            traceback.print_exc()
            self.result["error"] = f"engine init: {type(error).__name__}: {error}"
            self.save()
            return ENGINE_INIT_FAILED
        import traceback

        try:
            self.build_policy()
            self.save()
            for phase in self.args.phase_list:
                if phase == "memory":
                    continue  # measured while building the policy
                start = time.perf_counter()
                getattr(self, f"phase_{phase}")()
                self.result.setdefault("phase_seconds", {})[phase] = time.perf_counter() - start
                self.save()
        except Exception as error:  # noqa: BLE001 - the phases measured so far stay in the JSON
            traceback.print_exc()
            self.result["error"] = f"{type(error).__name__}: {error}"
            self.save()
            return PHASE_FAILED
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_config:
        with open(args.child_config, encoding="utf-8") as handle:
            config = json.load(handle)
        child_args = argparse.Namespace(**config)
        child_args.child_config = args.child_config
        return _Child(child_args).run()
    if args.table_only:
        results = load_results(args.out_dir)
        if not results:
            print(f"no precision_<dtype>.json in {args.out_dir}", file=sys.stderr)
            return 1
        print(format_table(results))
        return 0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
