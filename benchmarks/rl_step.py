"""The whole RL step at Llama-3-8B shapes: ``GRPOTrainer.training_step`` as a user runs it, before and after.

    python benchmarks/rl_step.py --quick      # about 4 minutes on one H200, engine start included
    python benchmarks/rl_step.py              # more steps per row, + the longest-completion search
    python benchmarks/rl_step.py --quick --layers 2 --eager --completion-len 64   # smoke test of the script

Setting: ``examples/gsm8k_grpo.py`` as it is (8 prompts × 8 generations × 512 completion tokens = 64 completions
per step, micro-batches of 16, 4 micro-steps per optimizer step, LoRA r16 on all 7 projections, rlcore's kernels,
standby on) on a Llama-3-8B ``config.json`` with vLLM's dummy weights and the tiny tokenizer, on the 200 bundled
GSM8K prompts. The engine ignores EOS, so every completion has exactly ``--completion-len`` tokens. vLLM runs with
CUDA graphs (as users run it; ``--eager`` starts faster but decodes far slower and would change the generate
share of the step, so it is for smoke tests only).

Rows, each a median over a few steps (the first step of the run is a warm-up: Triton and cuBLAS compile):

* **before**: the step as it was, re-created by two private switches, ``GRPOTrainer._separate_old_logps_pass``
  (a no-grad pass over the generation for the old log-probs, although the batch is on-policy) and
  ``VLLMEngine._legacy_standby`` (a garbage collection and a cache emptying on every sleep and wake, vLLM's own
  ``wake_up``, a prefix-cache reset on every sync). Not re-created: the host synchronisations removed from the
  micro-steps (metrics read once per step, no finiteness check before backward, row counts on the host), the
  fused AdamW; "before" is therefore somewhat faster than the old code in the training phase.
* **after**: the defaults. Interleaved with "before" (before, after, before, after, ...) so that drift in clocks
  or memory hits both alike.
* **after + padding_free**, **after + activation_memory_gib=G**: settings the trainer leaves off by default.
* **bare forward+backward**: ``completion_logprobs`` + a plain loss + backward on the same micro-batches of the
  same model, nothing else: the kernel benchmark's measurement at the trainer's shapes, the ceiling the training
  phase is compared with.
* raw ``vllm.LLM.generate`` on the same prompts and SamplingParams, with and without the LoRA (the engine's
  overhead), and (full mode) the longest completion whose forward+backward fits with the KV cache allocated and
  released.

Every phase runs in its own ``try``: an error is printed and the next phase runs; the JSON (``--out``) is written
after each phase. "tokens/s over the step" is the trainer's own metric: (trained + generated tokens) / step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import runpy
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

GIB = 2**30
STEP_KEYS = ("time_generate", "time_reward", "time_reference", "time_standby", "time_train", "time_sync", "time_step",
             "tokens_per_second", "train_tokens_per_second", "generation_tokens_per_second", "standby_sleep_seconds",
             "standby_wake_seconds", "standby_reset_prefix_cache_seconds", "standby_unmap_seconds",
             "standby_empty_cache_seconds", "standby_map_seconds", "standby_freed_gib", "completion_tokens",
             "completion_length_mean", "peak_memory_gib", "device_memory_used_gib", "mismatch_logp_diff_mean",
             "loss", "grad_norm")


def device_used_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / GIB


def phase(results: dict[str, Any], name: str, save: Callable[[], None], function: Callable[[], Any]) -> Any:
    """Runs one phase; an exception is printed and recorded, and the run goes on."""
    print(f"\n=== {name}", flush=True)
    start = time.perf_counter()
    try:
        value = function()
        results.setdefault("phase_seconds", {})[name] = time.perf_counter() - start
        return value
    except Exception as error:  # noqa: BLE001 - one failing phase must not cost the others (one GPU run)
        traceback.print_exc()
        results.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"[:2000]
        return None
    finally:
        save()


# ---------------------------------------------------------------------- the trainer
def build_trainer(args: argparse.Namespace):
    """The example's trainer on the dummy 8B directory (or ``--model-dir``)."""
    from rlcore.tiny_model import write_llama3_8b_dummy_dir
    from rlcore.trainer import GRPOTrainer

    example = runpy.run_path(os.path.join(ROOT, "examples", "gsm8k_grpo.py"))
    path = args.model_dir or write_llama3_8b_dummy_dir(tempfile.mkdtemp(prefix="llama3-8b-dummy-"),
                                                       layers=args.layers)
    completions = args.prompts * example["config"].num_generations
    if completions % args.micro_batch:
        raise ValueError(f"--prompts × num_generations ({completions}) must be a multiple of --micro-batch")
    config = example["config"].replace(
        output_dir=tempfile.mkdtemp(prefix="rl-step-"), max_steps=10_000, save_steps=10**9, report_to="none",
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=completions // args.micro_batch,
        max_completion_length=args.completion_len)
    model = example["model"].replace(
        model_name_or_path=path, load_format="auto" if args.model_dir else "dummy", enforce_eager=args.eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_seq_length=max(example["model"].max_seq_length, (config.max_prompt_length or 0) + args.completion_len))
    start = time.perf_counter()
    trainer = GRPOTrainer(model, reward_funcs=example["rewards"], args=config,
                          train_dataset=example["dataset"]("bundled"), show_progress=False)
    seconds = time.perf_counter() - start
    trainer.engine.ignore_eos = True  # every completion runs to max_completion_length
    return trainer, seconds


def configure(trainer, legacy: bool, padding_free: bool = False, keep_gib: float | None = None) -> None:
    """Switches between the rows: the private "before" switches, padding_free, layers kept out of recomputation."""
    from rlcore.kernels.recompute import set_checkpointed_layers
    from rlcore.model import plan_recompute

    trainer._separate_old_logps_pass = legacy
    trainer.engine._legacy_standby = legacy
    trainer.args.padding_free = padding_free  # read by every micro-step
    if keep_gib is None:
        set_checkpointed_layers(trainer.model, 0)  # every layer recomputed in backward (the default)
    else:
        plan_recompute(trainer.model, trainer.args.replace(activation_memory_gib=keep_gib))


def run_step(trainer, step: int) -> dict[str, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        metrics = trainer.training_step(step)
    except BaseException:
        trainer.optimizer.zero_grad(set_to_none=True)  # a failed step must not leak its gradient into the next
        trainer._nonfinite_in_step = False
        raise
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    row = {key: float(metrics[key]) for key in STEP_KEYS if isinstance(metrics.get(key), (int, float))}
    trained = metrics["train_tokens_per_second"] * metrics["time_train"]
    row.update(wall_seconds=wall, trained_tokens=trained,
               wall_tokens_per_second=(trained + metrics["completion_tokens"]) / wall,
               standby_seconds=metrics["standby_sleep_seconds"] + metrics["standby_wake_seconds"])
    print(f"step {step}: wall {wall:.2f} s = generate {row['time_generate']:.2f} + reference "
          f"{row['time_reference']:.2f} + standby {row['standby_seconds']:.3f} + train {row['time_train']:.2f} "
          f"+ sync {row['time_sync']:.3f} + reward {row['time_reward']:.2f}; {row['tokens_per_second']:,.0f} tok/s "
          f"over the step, train {row['train_tokens_per_second']:,.0f} tok/s", flush=True)
    return row


def median_row(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rows) for key in rows[0] if all(key in r for r in rows)}


# ---------------------------------------------------------------------- bare forward+backward
def bare_forward_backward(trainer, repeats: int = 2) -> dict[str, float]:
    """completion_logprobs + a plain loss + backward over the last generation's micro-batches (engine asleep)."""
    from rlcore.logprobs import completion_logprobs

    batch = trainer.buffers[max(trainer.buffers)]
    size = trainer.args.per_device_train_batch_size
    trainer.engine.sleep()
    best = None
    for _ in range(repeats):  # the first is a warm-up for shapes the trainer did not see
        torch.cuda.synchronize()
        start, tokens = time.perf_counter(), 0
        for first in range(0, batch.size, size):
            micro = batch.micro_batch(range(first, min(first + size, batch.size)))
            logps = completion_logprobs(trainer.model, micro.input_ids, micro.attention_mask, micro.width,
                                        trainer.args.temperature, trainer.args.logprob_chunk_size,
                                        packed=trainer.args.padding_free)
            (-(logps.float() * micro.loss_mask).sum() / max(1, int(batch.active_tokens(range(batch.size))))).backward()
            tokens += int(micro.attention_mask.sum())
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        trainer.optimizer.zero_grad(set_to_none=True)
        best = {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}
    return best


# ---------------------------------------------------------------------- raw vLLM
def raw_vllm(trainer) -> dict[str, Any]:
    engine = trainer.engine
    batch = trainer.buffers[max(trainer.buffers)]
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch.prompt_ids.cpu(), batch.prompt_mask.cpu())]
    sampling = trainer.sampling_settings(seed=12345)
    params = [engine.sampling_params(sampling, i) for i in range(len(prompts))]
    requests = [{"prompt_token_ids": p} for p in prompts]
    engine.wake()
    out: dict[str, Any] = {}
    runs = (("raw_lora", engine.lora_request), ("raw_no_lora", None), ("raw_lora_again", engine.lora_request))
    for label, lora in runs:
        torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = engine.llm.generate(requests, params, use_tqdm=False, lora_request=lora)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        out[label] = {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}
        print(f"{label}: {tokens / seconds:,.0f} tok/s ({seconds:.2f} s)", flush=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    rollouts = engine.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.completion_ids) for r in rollouts)
    out["engine"] = {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}
    out["engine_over_raw_lora"] = out["engine"]["tokens_per_second"] / max(
        out["raw_lora"]["tokens_per_second"], out["raw_lora_again"]["tokens_per_second"])
    print(f"VLLMEngine.generate: {tokens / seconds:,.0f} tok/s; / raw with LoRA {out['engine_over_raw_lora']:.3f}")
    engine.sleep()
    return out


# ---------------------------------------------------------------------- standby keeps the engine's outputs
def standby_check(trainer) -> dict[str, Any]:
    """Greedy completions before and after a sleep → (memory used and given back) → wake cycle must be identical:
    the prefix-cache reset and the re-mapped KV cache at 8B shapes, on the current (not legacy) path."""
    from rlcore.rollout import SamplingSettings

    engine = trainer.engine
    batch = trainer.buffers[max(trainer.buffers)]
    prompts = [ids[mask.bool()].tolist()
               for ids, mask in zip(batch.prompt_ids[:16].cpu(), batch.prompt_mask[:16].cpu())]
    greedy = SamplingSettings(max_tokens=48, greedy=True)
    engine.wake()
    before = [r.completion_ids for r in engine.generate(prompts, greedy)]
    again = [r.completion_ids for r in engine.generate(prompts, greedy)]  # prefix-cache hits
    slept = engine.sleep()
    block = torch.empty(int(0.8 * slept.freed_bytes), dtype=torch.uint8, device="cuda")
    block.fill_(7)  # the freed memory is used meanwhile, as training uses it
    del block  # back in PyTorch's cache: the wake has to hand it back
    woke = engine.wake()
    after = [r.completion_ids for r in engine.generate(prompts, greedy)]
    engine.sleep()
    out = {"identical": before == after == again, "sleep": dataclasses.asdict(slept), "wake": dataclasses.asdict(woke)}
    print(f"greedy outputs identical across standby: {out['identical']} (sleep {slept.seconds:.3f} s, wake "
          f"{woke.seconds:.3f} s of which empty_cache {woke.empty_cache_seconds:.3f} s)", flush=True)
    return out


# ---------------------------------------------------------------------- longest completion that trains
def fits(trainer, length: int, prompt_len: int, vocab: int) -> bool:
    from rlcore.logprobs import completion_logprobs

    ok = True
    try:
        ids = torch.randint(0, vocab, (1, prompt_len + length), device="cuda")
        logps = completion_logprobs(trainer.model, ids, torch.ones_like(ids), length, 1.0,
                                    trainer.args.logprob_chunk_size)
        (-logps.float().mean()).backward()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        ok = False
    except Exception as error:  # noqa: BLE001 - e.g. a kernel's size limit: reported as "does not fit"
        print(f"  failed with {type(error).__name__}: {str(error)[:200]}")
        ok = False
    trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return ok


def longest_fitting(trainer, lengths: list[int], prompt_len: int, vocab: int) -> int:
    best = 0
    for length in lengths:
        start = time.perf_counter()
        ok = fits(trainer, length, prompt_len, vocab)
        print(f"  completion {length:>6}: {'fits' if ok else 'OOM'} ({time.perf_counter() - start:.1f} s)", flush=True)
        if not ok:
            break
        best = length
    return best


# ---------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps per row, no length search (≈ 4 min)")
    parser.add_argument("--model-dir", default=None, help="a real checkpoint instead of dummy weights")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smoke tests)")
    parser.add_argument("--prompts", type=int, default=8, help="unique prompts per step (× 8 generations)")
    parser.add_argument("--completion-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=16, help="completions per micro-step")
    parser.add_argument("--repeats", type=int, default=None, help="steps per before/after row (2 quick, 3 full)")
    parser.add_argument("--keep-gib", type=float, default=40.0,
                        help="activation_memory_gib of the 'after + activation_memory_gib' row (0: skip the row)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs (faster start, much slower decode)")
    parser.add_argument("--search-lengths", default=None,
                        help="completion lengths tried upward until OOM (default: none with --quick, else "
                             "1024,...,65536)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "rl_step.json"))
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    extra_repeats = 1 if args.quick else 2
    if args.search_lengths is None:
        args.search_lengths = "" if args.quick else "1024,2048,4096,8192,16384,32768,65536"

    import vllm

    results: dict[str, Any] = {"args": vars(args), "vllm": vllm.__version__, "torch": torch.__version__,
                               "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"vllm {vllm.__version__}, torch {torch.__version__}, {results['device']}", flush=True)

    def save() -> None:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2, default=str)

    built = phase(results, "build the trainer (vLLM engine, shared weights, LoRA, kernels)", save,
                  lambda: build_trainer(args))
    if built is None:
        print("the trainer could not be built; nothing else can run")
        return 1
    trainer, init_seconds = built
    results["init"] = {"seconds": init_seconds, "engine_seconds": trainer.engine.init_seconds,
                       "kv_cache_tokens": trainer.engine.kv_cache_tokens, "device_used_gib": device_used_gib(),
                       "trainable_parameters": sum(p.numel() for p in trainer.trainable),
                       "setting": {"prompts": args.prompts, "generations": trainer.args.num_generations,
                                   "completion_len": args.completion_len, "micro_batch": args.micro_batch,
                                   "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps}}
    print(f"trainer built in {init_seconds:.1f} s (engine {trainer.engine.init_seconds:.1f} s), KV cache "
          f"{trainer.engine.kv_cache_tokens} tokens", flush=True)
    save()

    step = 0
    rows: dict[str, list[dict[str, float]]] = {}

    def steps(label: str, count: int, **settings: Any) -> None:
        nonlocal step
        configure(trainer, **settings)
        for _ in range(count):
            row = run_step(trainer, step)
            step += 1
            rows.setdefault(label, []).append(row)
            results["rows"] = {name: {"steps": values, "median": median_row(values)} for name, values in rows.items()}
            save()

    phase(results, "warm-up step (after)", save, lambda: steps("warm-up", 1, legacy=False))

    def before_and_after() -> None:
        for _ in range(repeats):
            steps("before", 1, legacy=True)
            steps("after", 1, legacy=False)

    phase(results, f"before / after, {repeats} steps each, interleaved", save, before_and_after)
    phase(results, "after + padding_free", save,
          lambda: steps("after + padding_free", extra_repeats, legacy=False, padding_free=True))
    if args.keep_gib:
        phase(results, f"after + activation_memory_gib={args.keep_gib:g}", save,
              lambda: steps(f"after + activation_memory_gib={args.keep_gib:g}", extra_repeats, legacy=False,
                            keep_gib=args.keep_gib))
    phase(results, "restore the defaults", save, lambda: configure(trainer, legacy=False))
    results["bare_forward_backward"] = phase(results, "bare forward+backward on the same micro-batches", save,
                                             lambda: bare_forward_backward(trainer))
    results["raw_vllm"] = phase(results, "raw vllm.LLM.generate on the same prompts", save, lambda: raw_vllm(trainer))
    results["standby_check"] = phase(results, "standby keeps greedy outputs", save, lambda: standby_check(trainer))

    if args.search_lengths:
        lengths = [int(x) for x in args.search_lengths.split(",") if x]
        vocab = trainer.engine.hf_config().vocab_size
        search: dict[str, Any] = {"prompt_len": 128}

        def search_awake() -> None:
            trainer.engine.wake()
            search["train_fits_without_standby"] = longest_fitting(trainer, lengths, 128, vocab)

        def search_asleep() -> None:
            trainer.engine.sleep()
            search["train_fits_with_standby"] = longest_fitting(trainer, lengths, 128, vocab)

        phase(results, "length search, KV cache allocated (no standby)", save, search_awake)
        phase(results, "length search, KV cache released (standby)", save, search_asleep)
        kv_tokens = trainer.engine.kv_cache_tokens
        if kv_tokens:
            search["generation_limit_8_completions"] = kv_tokens // trainer.args.num_generations - 128
        results["length_search"] = search
        save()

    print_tables(results)
    save()
    return 0


# ---------------------------------------------------------------------- tables
def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def print_tables(results: dict[str, Any]) -> None:
    medians = {name: row["median"] for name, row in results.get("rows", {}).items()}
    init = results.get("init", {})
    setting = init.get("setting", {})
    print(f"\n{results.get('device')}, vllm {results.get('vllm')}, torch {results.get('torch')}; "
          f"{setting.get('prompts')} prompts × {setting.get('generations')} generations × "
          f"{setting.get('completion_len')} tokens, micro-batch {setting.get('micro_batch')} × "
          f"{setting.get('gradient_accumulation_steps')}; trainer built in {_number(init.get('seconds'), 1)} s")
    before, after = medians.get("before"), medians.get("after")
    if before and after:
        lines = [
            ("whole step, wall clock (s)", "wall_seconds", False),
            ("tokens/s over the step (trainer metric)", "tokens_per_second", True),
            ("tokens/s over the step (wall clock)", "wall_tokens_per_second", True),
            ("generate (s)", "time_generate", False),
            ("old log-prob pass (s)", "time_reference", False),
            ("standby: sleep + wake (s)", "standby_seconds", False),
            ("  sleep (s)", "standby_sleep_seconds", False),
            ("  wake (s)", "standby_wake_seconds", False),
            ("  reset_prefix_cache (s)", "standby_reset_prefix_cache_seconds", False),
            ("  unmap (s)", "standby_unmap_seconds", False),
            ("  empty_cache / gc (s)", "standby_empty_cache_seconds", False),
            ("  map (s)", "standby_map_seconds", False),
            ("train: micro-steps + optimizer (s)", "time_train", False),
            ("train tokens/s", "train_tokens_per_second", True),
            ("sync (s)", "time_sync", False),
            ("reward (s)", "time_reward", False),
            ("generation tokens/s", "generation_tokens_per_second", True),
            ("device memory in use after the step (GiB)", "device_memory_used_gib", False),
        ]
        print("\n| per step (median) | before | after | after / before |\n| --- | --- | --- | --- |")
        for label, key, _ in lines:
            b, a = before.get(key), after.get(key)
            ratio = f"{a / b:.2f}×" if a is not None and b else "—"
            print(f"| {label} | {_number(b)} | {_number(a)} | {ratio} |")
    settings = [name for name in medians if name.startswith("after")]
    if settings:
        print("\n| setting (median) | step s | train s | train tok/s | tok/s over the step | device GiB |\n"
              "| --- | --- | --- | --- | --- | --- |")
        for name in settings:
            m = medians[name]
            print(f"| {name} | {_number(m.get('wall_seconds'))} | {_number(m.get('time_train'))} | "
                  f"{_number(m.get('train_tokens_per_second'))} | {_number(m.get('tokens_per_second'))} | "
                  f"{_number(m.get('device_memory_used_gib'), 1)} |")
    bare = results.get("bare_forward_backward")
    if bare and after:
        print(f"\nbare forward+backward on the same micro-batches: {bare['tokens_per_second']:,.0f} tok/s; the "
              f"trainer's training phase: {after['train_tokens_per_second']:,.0f} tok/s "
              f"({after['train_tokens_per_second'] / bare['tokens_per_second']:.3f} of it)")
    raw = results.get("raw_vllm")
    if raw:
        print(f"raw vllm.LLM.generate: {raw['raw_lora']['tokens_per_second']:,.0f} tok/s with the LoRA, "
              f"{raw['raw_no_lora']['tokens_per_second']:,.0f} without; VLLMEngine.generate "
              f"{raw['engine']['tokens_per_second']:,.0f} ({raw['engine_over_raw_lora']:.3f} of raw)")
    check = results.get("standby_check")
    if check:
        print(f"greedy outputs identical before / after a standby cycle: {check['identical']}")
    search = results.get("length_search")
    if search:
        print(f"longest completion whose forward+backward fits: {search.get('train_fits_without_standby')} with the "
              f"KV cache allocated, {search.get('train_fits_with_standby')} released; 8 generations fit the KV "
              f"cache up to {search.get('generation_limit_8_completions')} tokens")
    if results.get("errors"):
        print("\nphases that failed:")
        for name, error in results["errors"].items():
            print(f"  {name}: {error}")


if __name__ == "__main__":
    sys.exit(main())
