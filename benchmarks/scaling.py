"""Data-parallel scaling: GRPO samples/s on 1 GPU and on 2 GPUs (torchrun), Llama-3-8B shapes, dummy weights.

Each GPU runs the whole one-GPU design (its own in-process vLLM engine sharing weights with its own LoRA trainer)
on the same per-GPU work: ``--prompts`` prompts × 8 generations of ``--completion-len`` tokens (EOS ignored, so
every completion has that length), trained in micro-batches of ``--micro-batch`` with one optimizer step per
generation. With W GPUs a step trains W times the completions (weak scaling); the LoRA gradients are averaged
with one all-reduce per step. samples/s = completions trained per second over the whole job; the ratio column
is samples/s against the 1-GPU row (ideal: W). Run on a machine with 2 GPUs and vllm installed:

    python benchmarks/scaling.py                       # the table (≈ 7 min: model loads dominate)
    python benchmarks/scaling.py --layers 2 --eager --completion-len 64 --steps 1    # smoke test (≈ 2 min)

The script starts ``torchrun --standalone --nproc_per_node W benchmarks/scaling.py --worker ...`` for W = 1, 2;
rank 0 of each writes its numbers to a JSON file, and this process prints one table and writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ---------------------------------------------------------------------- one torchrun job (every rank runs this)
def worker(args: argparse.Namespace) -> None:
    import runpy

    import torch

    from rlcore.trainer import GRPOTrainer

    example = runpy.run_path(os.path.join(ROOT, "examples", "gsm8k_grpo.py"))
    completions = args.prompts * example["config"].num_generations
    if completions % args.micro_batch:
        raise ValueError(f"--prompts × num_generations ({completions}) must be a multiple of --micro-batch")
    config = example["config"].replace(
        output_dir=tempfile.mkdtemp(prefix="scaling-"), max_steps=10_000, save_steps=10**9, report_to="none",
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=completions // args.micro_batch,
        max_completion_length=args.completion_len, ddp_timeout=1200)
    model = example["model"].replace(
        model_name_or_path=args.model_dir, load_format="dummy", engine="vllm", enforce_eager=args.eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_seq_length=max(example["model"].max_seq_length, (config.max_prompt_length or 0) + args.completion_len))
    start = time.perf_counter()
    trainer = GRPOTrainer(model, reward_funcs=example["rewards"], args=config,
                          train_dataset=example["dataset"]("bundled"), show_progress=False)
    load_seconds = time.perf_counter() - start
    trainer.engine.ignore_eos = True  # every completion runs to max_completion_length
    ranks = trainer.ranks
    trainer.model.train()
    for step in range(args.warmup):
        trainer.training_step(step)
    steps = []
    for step in range(args.warmup, args.warmup + args.steps):
        ranks.all_reduce_sum([0.0], "the start of a timed step")  # every rank starts the step together
        torch.cuda.synchronize()
        started = time.perf_counter()
        metrics = trainer.training_step(step)
        torch.cuda.synchronize()
        ranks.all_reduce_sum([0.0], "the end of a timed step")  # the step ends when the slowest rank is done
        seconds = time.perf_counter() - started
        parts = ranks.all_gather_objects({k: metrics.get(k, 0.0) for k in ("time_generate", "time_train",
                                                                             "time_reward", "time_sync")},
                                         "the step's time split")
        steps.append({"seconds": seconds, **{k: max(p[k] for p in parts) for k in parts[0]}})
    if ranks.is_main:
        per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * ranks.world_size
        total = sum(s["seconds"] for s in steps)
        result = {
            "gpus": ranks.world_size, "gpu": torch.cuda.get_device_name(), "completions_per_step": per_step,
            "completion_len": args.completion_len, "load_seconds": load_seconds, "steps": steps,
            "seconds_per_step": total / len(steps), "samples_per_second": per_step * len(steps) / total,
            "tokens_per_second": per_step * args.completion_len * len(steps) / total,
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    ranks.shutdown()


# ---------------------------------------------------------------------- the table (a plain python process)
def run_job(gpus: int, args: argparse.Namespace, model_dir: str) -> dict | None:
    out = os.path.join(tempfile.mkdtemp(prefix=f"scaling-{gpus}gpu-"), "result.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               os.path.abspath(__file__), "--worker", "--json", out, "--model-dir", model_dir,
               "--prompts", str(args.prompts), "--completion-len", str(args.completion_len),
               "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization)] + (["--eager"] if args.eager else [])
    print(f"$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    print(f"  ({gpus} GPU job: exit {finished.returncode}, {time.perf_counter() - started:.0f} s)", flush=True)
    if finished.returncode != 0 or not os.path.isfile(out):
        return None
    with open(out, encoding="utf-8") as handle:
        return json.load(handle)


def table(rows: list[dict | None], gpus: list[int]) -> str:
    lines = ["| GPUs | completions / step | s / step | samples/s | vs 1 GPU | generate s | train s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    base = rows[0]["samples_per_second"] if rows and rows[0] else None
    for count, row in zip(gpus, rows):
        if row is None:
            lines.append(f"| {count} | (not run or failed) | | | | | |")
            continue
        last = row["steps"][-1]
        ratio = f"{row['samples_per_second'] / base:.2f}×" if base else ""
        lines.append(f"| {count} | {row['completions_per_step']} | {row['seconds_per_step']:.2f} | "
                     f"{row['samples_per_second']:.1f} | {ratio} | {last['time_generate']:.2f} | "
                     f"{last['time_train']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help="a directory with Llama-3-8B's config.json (written "
                                                          "if not given)")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smoke tests)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per GPU per step (× 8 generations)")
    parser.add_argument("--completion-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=16, help="completions per micro-step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per job")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (CUDA graphs, allocator)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs (faster start, slower decode)")
    parser.add_argument("--gpus", default="1,2", help="the job sizes to run, comma-separated")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "scaling.json"))
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    from rlcore.tiny_model import write_llama3_8b_dummy_dir

    gpus = [int(g) for g in args.gpus.split(",")]
    available = torch.cuda.device_count()
    model_dir = args.model_dir or write_llama3_8b_dummy_dir(tempfile.mkdtemp(prefix="llama3-8b-dummy-"),
                                                            layers=args.layers)
    rows = []
    for count in gpus:
        if count > available:
            print(f"skipping {count} GPUs: this machine has {available}", flush=True)
            rows.append(None)
            continue
        rows.append(run_job(count, args, model_dir))
    text = table(rows, gpus)
    print("\n" + text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"rows": rows, "table": text, "args": vars(args)}, handle, indent=2)


if __name__ == "__main__":
    main()
