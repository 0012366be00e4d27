"""Does GRPO learn through the shared-weight vLLM engine? One command, one GPU, a few minutes.

    python benchmarks/learning_gpu.py              # GPU: build the model, GRPO via vLLM, the same via HF, plot, table
    python benchmarks/learning_gpu.py --runs vllm,vllm-float16,vllm-float8     # the same run in each dtype
    python benchmarks/learning_gpu.py --runs vllm-graphs,trl                   # rlcore and TRL 1.16, same budget
    python benchmarks/learning_gpu.py --smoke      # CPU, tiny sizes, HF engine only: the whole script in seconds

Phases, each in its own process with its own wall-clock budget (a crash or a hang in one loses only that one):

1. **build**: the ~100M-parameter arithmetic model of ``rlcore.arithmetic`` (tokenizer, Llama-3 model, supervised
   fine-tuning on a sloppy tutor's solutions, ``--sft-seconds``), then its held-out greedy accuracy.
2. **GRPO through vLLM** (``engine="vllm"``, standby on): ``examples/arithmetic_grpo.py``'s settings, evaluated on
   the held-out problems (greedy) before the first step and every ``eval_steps``; it stops at the first evaluation
   after which another ``eval_steps`` steps would overrun ``--grpo-seconds``.
3. **the same GRPO through transformers' generate** (``engine="hf"``): the same settings and learning-rate schedule,
   stopped at the step the vLLM run reached, or earlier by the same wall-clock budget.

``--runs`` names the runs, in order: ``vllm`` / ``hf`` (rlcore's engines), a dtype suffix ``-float16`` or
``-float8`` (weights in that precision in vLLM and, shared, in the trainer; default bfloat16), ``-graphs`` (vLLM
with CUDA graphs instead of eager), and ``trl``: the same GRPO through TRL 1.16's GRPOTrainer with colocated vLLM
(:mod:`learning_trl`), given as wall-clock budget the step time of the first run (evaluation left out on both
sides). Later rlcore runs stop at the step the first one reached.

Then one PNG with the runs' reward and held-out accuracy against step and against wall time, and a markdown table:
accuracy before → after, steps, time split per step, the train/inference mismatch (against step too, in the PNG) and the importance-sampling
weights, versions and device. Written to ``$OUT`` (or ``--out``): learning_curves.png, learning_table.md,
results.json, metrics_<run>.jsonl, learning_log.txt. The whole run stops by ``--deadline`` seconds.
``--replot DIR`` redraws the PNG and the table from those files.

vLLM must run in this process's children as the engine expects: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set by the
engine itself when unset).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing: rlcore is the folder beside this one
    sys.path.insert(1, ROOT)
EXAMPLE = os.path.join(ROOT, "examples", "arithmetic_grpo.py")
ACCURACY = "eval_rewards/correct_answer"
STEP_TIMES = ("generate", "reward", "reference", "train", "sync", "standby")
DTYPES = ("bfloat16", "float16", "float8")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of ``--runs``: ``<engine>[-<dtype>][-graphs]`` with engine ``vllm``, ``hf`` or ``trl``."""

    name: str
    engine: str
    dtype: str = "bfloat16"
    graphs: bool = False

    @property
    def framework(self) -> str:
        return "trl" if self.engine == "trl" else "rlcore"

    @property
    def label(self) -> str:
        if self.engine == "trl":
            return "TRL 1.16 (colocated vLLM, sleep mode)"
        if self.engine == "hf":
            engine = "transformers generate"
        elif self.graphs:
            engine = "vLLM (shared weights, standby, CUDA graphs)"
        else:
            engine = "vLLM (shared weights, standby)"
        return f"rlcore, {engine}" + ("" if self.dtype == "bfloat16" else f", {self.dtype}")


def parse_run(name: str) -> RunSpec:
    """``vllm``, ``vllm-float8``, ``vllm-graphs``, ``hf``, ``trl``, ...; a clear error for anything else."""
    engine, *options = name.split("-")
    if engine not in ("vllm", "hf", "trl"):
        raise ValueError(f"run {name!r}: the engine must be vllm, hf or trl")
    dtype, graphs = None, False
    for option in options:
        if option in DTYPES and dtype is None:
            dtype = option
        elif option == "graphs" and not graphs:
            graphs = True
        else:
            raise ValueError(f"run {name!r}: unknown or repeated option {option!r} (expected at most one of "
                             f"{DTYPES}, and graphs)")
    dtype = dtype or "bfloat16"
    if graphs and engine != "vllm":
        raise ValueError(f"run {name!r}: -graphs applies to the vllm engine only")
    if engine == "trl" and dtype != "bfloat16":
        raise ValueError(f"run {name!r}: the TRL run is bf16 only")
    if engine == "hf" and dtype == "float8":
        raise ValueError(f"run {name!r}: float8 weights need the vllm engine")
    return RunSpec(name, engine, dtype, graphs)


# ------------------------------------------------------------------------------------------ phase: build
def phase_build(options) -> int:
    from rlcore.arithmetic import SMALL_BUILD, TINY_BUILD, build_arithmetic_model

    settings = TINY_BUILD if options.smoke else SMALL_BUILD
    sft = dataclasses.replace(settings.sft, max_seconds=options.sft_seconds,
                              **({"steps": 40, "log_every": 10} if options.smoke else {}))
    settings = dataclasses.replace(settings, sft=sft)
    started = time.perf_counter()
    build_arithmetic_model(options.model_dir, settings, log=lambda text: print(text, flush=True))
    print(f"build done in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


# ------------------------------------------------------------------------------------------- phase: GRPO
class BudgetReached(Exception):
    """Raised by :class:`WallBudget` after an evaluation when the next ``eval_steps`` steps would not fit."""


class WallBudget:
    """A trainer callback: records each step's wall time and stops the run at the last evaluation that fits."""

    def __init__(self, seconds: float, eval_steps: int, stop_at_step: int | None = None) -> None:
        self.seconds, self.eval_steps, self.stop_at_step = seconds, eval_steps, stop_at_step
        self.started = time.perf_counter()
        self.eval_seconds = 0.0  # left out of the budget and of the curves' wall clock (TRL's run does the same)
        self.wall: list[tuple[int, float]] = []

    def start(self) -> None:
        self.started = time.perf_counter()

    def timed_evaluation(self, evaluate):
        """``evaluate`` with its time added to :attr:`eval_seconds`."""

        def run():
            started = time.perf_counter()
            try:
                return evaluate()
            finally:
                self.eval_seconds += time.perf_counter() - started

        return run

    def __call__(self, trainer, step: int, metrics: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - self.started - self.eval_seconds
        self.wall.append((step, elapsed))
        accuracy = metrics.get(ACCURACY)
        print(f"  step {step:4d}  {elapsed:7.1f} s  reward {metrics.get('reward_mean', float('nan')):.3f}"
              f"  step time {metrics.get('time_step', float('nan')):.2f} s"
              f"  mismatch |dlogp| {metrics.get('mismatch_logp_diff_mean', float('nan')):.4f}"
              + (f"  held-out accuracy {accuracy:.3f}" if accuracy is not None else ""), flush=True)
        if step % self.eval_steps == 0:
            per_step = elapsed / max(step, 1)  # evaluations included
            if elapsed + self.eval_steps * per_step > self.seconds or step == self.stop_at_step:
                raise BudgetReached(step)


def phase_grpo(options) -> int:
    started = time.perf_counter()
    import torch

    from rlcore.run import load_example
    from rlcore.trainer import GRPOTrainer

    example = load_example(EXAMPLE)
    eval_steps = 2 if options.smoke else example.config.eval_steps
    steps = -(-options.max_steps // eval_steps) * eval_steps  # a multiple of eval_steps: the last step evaluates
    # the learning-rate schedule spans max_steps in every run; --stop-at-step ends one early (same steps as another)
    model_changes: dict[str, Any] = {"model_name_or_path": options.model_dir, "engine": options.engine,
                                     "dtype": options.dtype}
    if options.graphs:
        model_changes["enforce_eager"] = False
    grpo_changes: dict[str, Any] = {"output_dir": options.run_dir, "max_steps": steps, "save_steps": steps,
                                    "seed": options.seed}
    rows, eval_rows = example.dataset(), example.eval_dataset()
    if options.smoke:
        model_changes.update(dtype="float32")
        grpo_changes.update(learning_rate=3e-3, per_device_train_batch_size=16, max_completion_length=48,
                            gradient_checkpointing=False, eval_steps=eval_steps)
        eval_rows = eval_rows[:32]
    model_config = example.model.replace(**model_changes)
    grpo_config = example.config.replace(**grpo_changes)
    budget = WallBudget(options.seconds, eval_steps, options.stop_at_step)
    trainer = GRPOTrainer(model_config, reward_funcs=example.rewards, args=grpo_config, train_dataset=rows,
                          eval_dataset=eval_rows, callbacks=[budget], show_progress=False)
    trainer.evaluate = budget.timed_evaluation(trainer.evaluate)  # this benchmark's instrument, on its own object
    setup_seconds = time.perf_counter() - started
    print(f"GRPO with engine {trainer.engine.name}: set up in {setup_seconds:.1f} s; up to {steps} steps or "
          f"{options.seconds:.0f} s", flush=True)
    budget.start()
    stopped_by_budget = False
    try:
        trainer.train()
    except BudgetReached as reached:
        stopped_by_budget = True
        why = ("the step the previous engine reached" if reached.args[0] == options.stop_at_step else
               f"another {eval_steps} steps would overrun {options.seconds:.0f} s")
        print(f"stopped after step {reached.args[0]}: {why}", flush=True)
    result = {
        "engine": trainer.engine.name, "framework": "rlcore", "dtype": model_config.dtype,
        "steps": budget.wall[-1][0] if budget.wall else 0,
        "grpo_seconds": time.perf_counter() - budget.started, "setup_seconds": setup_seconds,
        "train_seconds": budget.wall[-1][1] if budget.wall else 0.0, "eval_seconds": budget.eval_seconds,
        "engine_init_seconds": getattr(trainer.engine, "init_seconds", None), "wall": budget.wall,
        "stopped_by_budget": stopped_by_budget, "budget_seconds": options.seconds,
        "config": {"model": model_config.to_dict(), "grpo": grpo_config.to_dict()},
        "versions": versions(), "device": device_name(torch),
    }
    with open(options.result, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    sys.stdout.flush()
    # The result is on disk; skip interpreter teardown, where an in-process engine's threads can hang the exit.
    os._exit(0)


# ----------------------------------------------------------------------------------------- orchestration
def versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in ("torch", "vllm", "transformers", "peft", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(torch) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


class Phases:
    """Runs phases as child processes, streaming their output with a timestamp into stdout and a log file."""

    def __init__(self, log_path: str, deadline: float) -> None:
        self.started = time.perf_counter()
        self.deadline = deadline
        self.log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - written until close()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.deadline - self.elapsed()

    def say(self, text: str) -> None:
        for line in text.splitlines() or [""]:
            stamped = f"[{self.elapsed():6.1f}s] {line}"
            print(stamped, flush=True)
            self.log.write(stamped + "\n")
        self.log.flush()

    def run(self, name: str, arguments: list[str], timeout: float) -> bool:
        """True when the phase exited 0 within ``timeout`` seconds; a phase past it is killed (its process group)."""
        self.say(f"== {name}: up to {timeout:.0f} s")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        process = subprocess.Popen([sys.executable, os.path.abspath(__file__), *arguments], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                   start_new_session=True)
        reader = threading.Thread(target=self._relay, args=(process, name), daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.say(f"== {name}: past {timeout:.0f} s, stopping it")
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            code = None
        reader.join(timeout=5)
        self.say(f"== {name}: {'exit ' + str(code) if code is not None else 'killed'} at {self.elapsed():.0f} s")
        return code == 0

    def close(self) -> None:
        self.log.close()

    def _relay(self, process, name: str) -> None:
        for line in process.stdout:
            self.say(f"  {name} | {line.rstrip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, HF engine only, a few steps")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "outputs", "learning_gpu"))
    parser.add_argument("--work-dir", default=None, help="model and run directories (default: a new temp dir)")
    parser.add_argument("--model-dir", default=None,
                        help="the arithmetic model's directory: used if built there already, else built there")
    parser.add_argument("--runs", "--engines", dest="runs", default=None,
                        help="comma-separated runs, in order, e.g. vllm,vllm-float8,trl (default: vllm,hf; smoke: hf)")
    parser.add_argument("--deadline", type=float, default=450.0, help="seconds for everything (default 450)")
    parser.add_argument("--sft-seconds", type=float, default=100.0, help="fine-tuning budget (default 100)")
    parser.add_argument("--grpo-seconds", type=float, default=100.0, help="GRPO budget per engine (default 100)")
    parser.add_argument("--max-steps", type=int, default=None, help="GRPO steps at most (default: the example's)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--replot", metavar="DIR", help="redraw the PNG and the table from a finished run's files")
    # one phase, run by the orchestration above in a child process
    parser.add_argument("--phase", choices=("build", "grpo", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--graphs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stop-at-step", type=int, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.phase == "build":
        return phase_build(options)
    if options.phase == "grpo":
        return phase_grpo(options)
    if options.phase == "trl":
        from learning_trl import phase_trl

        return phase_trl(options)
    if options.replot:
        return replot(options.replot)
    return orchestrate(options)


def orchestrate(options) -> int:
    if options.smoke:
        options.sft_seconds = min(options.sft_seconds, 60.0)
        options.grpo_seconds = min(options.grpo_seconds, 60.0)
        options.max_steps = options.max_steps or 4
        options.deadline = min(options.deadline, 600.0)
    try:
        specs = [parse_run(name) for name in (options.runs or ("hf" if options.smoke else "vllm,hf")).split(",")]
    except ValueError as error:
        raise SystemExit(f"--runs: {error}") from None
    if len({spec.name for spec in specs}) != len(specs):
        raise SystemExit(f"--runs: a run is named twice in {options.runs!r}")
    os.makedirs(options.out, exist_ok=True)
    work = options.work_dir or tempfile.mkdtemp(prefix="rlcore-learning-")
    phases = Phases(os.path.join(options.out, "learning_log.txt"), options.deadline)
    phases.say(f"learning benchmark: runs {[spec.name for spec in specs]}, outputs in {options.out}, work dir {work}, "
               f"deadline {options.deadline:.0f} s{' (smoke)' if options.smoke else ''}")
    smoke = ["--smoke"] if options.smoke else []
    model_dir = options.model_dir or os.path.join(work, "model")
    if not os.path.isfile(os.path.join(model_dir, "arithmetic_build.json")):
        ok = phases.run("build", ["--phase", "build", "--model-dir", model_dir, "--sft-seconds",
                                  str(options.sft_seconds), *smoke],
                        timeout=min(options.sft_seconds * 1.5 + 90, phases.remaining() - 30))
        if not ok:
            phases.say("the build failed: nothing to train")
            return 1
    from rlcore.arithmetic import read_build_report

    build = read_build_report(model_dir)
    import importlib.util

    spec = importlib.util.spec_from_file_location("arithmetic_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    max_steps = options.max_steps or example.config.max_steps
    stop_at: list[str] = []  # the step the first run reached: later rlcore runs stop there too
    first_train_seconds: float | None = None  # the first run's step time: TRL's wall-clock budget
    runs: dict[str, dict[str, Any]] = {}
    for index, spec in enumerate(specs):
        run_dir = os.path.join(work, f"grpo-{spec.name}")
        result_path = os.path.join(work, f"result-{spec.name}.json")
        if os.path.exists(run_dir):  # a rerun in the same work dir starts the run afresh
            shutil.rmtree(run_dir)
        later = len(specs) - index - 1
        # leave the runs still to come their budget plus start-up, and 20 s for the plot
        seconds = min(options.grpo_seconds, phases.remaining() - later * (options.grpo_seconds + 60) - 90)
        if seconds < (1 if options.smoke else 10):
            phases.say(f"== grpo-{spec.name}: skipped, {phases.remaining():.0f} s left before the deadline")
            continue
        if spec.framework == "trl" and first_train_seconds:  # after the check: TRL runs at least one step
            seconds = min(seconds, first_train_seconds)
        startup = 60 if spec.engine == "hf" else 150
        arguments = ["--phase", "trl" if spec.framework == "trl" else "grpo", "--engine", spec.engine,
                     "--dtype", spec.dtype, *(["--graphs"] if spec.graphs else []), "--model-dir", model_dir,
                     "--run-dir", run_dir, "--result", result_path, "--seconds", str(seconds),
                     "--max-steps", str(max_steps), "--seed", str(options.seed),
                     *(stop_at if spec.framework == "rlcore" else []), *smoke]
        ok = phases.run(f"grpo-{spec.name}", arguments, timeout=min(seconds * 1.3 + startup, phases.remaining() - 20))
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.isfile(metrics_path):
            shutil.copy(metrics_path, os.path.join(options.out, f"metrics_{spec.name}.jsonl"))
            result = {"engine": spec.engine}
            if os.path.isfile(result_path):
                with open(result_path, encoding="utf-8") as handle:
                    result = json.load(handle)
            result.update(name=spec.name, label=spec.label, metrics=read_records(metrics_path), completed=ok)
            runs[spec.name] = result
            if ok and result.get("steps") and index == 0:
                stop_at = ["--stop-at-step", str(result["steps"])]  # later rlcore runs run as many steps
                first_train_seconds = result.get("train_seconds")
    summary = {"build": build, "runs": {k: {n: v for n, v in r.items() if n != "metrics"} for k, r in runs.items()},
               "smoke": options.smoke, "seconds": phases.elapsed()}
    with open(os.path.join(options.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, default=str)
    if runs:
        phases.say(write_report(runs, build, options.out))
    phases.say(f"done in {phases.elapsed():.0f} s; files in {options.out}: {', '.join(sorted(os.listdir(options.out)))}")
    phases.close()
    return 0 if runs and all(r.get("completed") for r in runs.values()) else 1


# ------------------------------------------------------------------------------------------ plot and table
def write_report(runs: dict[str, dict[str, Any]], build: dict[str, Any], directory: str) -> str:
    """Writes learning_table.md and learning_curves.png into ``directory``; returns the table."""
    table = markdown_table(runs, build)
    with open(os.path.join(directory, "learning_table.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    try:
        plot_runs(runs, os.path.join(directory, "learning_curves.png"), build)
    except Exception as error:  # noqa: BLE001 - the table and the metrics files matter more than the picture
        table += f"\n\n(no plot: {type(error).__name__}: {error}; redraw with --replot {directory})"
    return table


def replot(directory: str) -> int:
    """Redraws the PNG and the table from ``directory``'s results.json and metrics_<engine>.jsonl."""
    with open(os.path.join(directory, "results.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    runs = {}
    for engine, run in summary["runs"].items():
        path = os.path.join(directory, f"metrics_{engine}.jsonl")
        if os.path.isfile(path):
            runs[engine] = {**run, "metrics": read_records(path)}
    if not runs:
        raise SystemExit(f"{directory}: no metrics_<engine>.jsonl to draw")
    print(write_report(runs, summary["build"], directory))
    return 0


def read_records(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def curves(run: dict[str, Any]) -> dict[str, list]:
    """Per-step reward and held-out accuracy, against step and against wall seconds since GRPO began."""
    wall = dict(run.get("wall") or [])
    wall[0] = 0.0
    reward = [(r["step"], r["reward_mean"]) for r in run["metrics"] if "reward_mean" in r]
    accuracy = [(r["step"], r[ACCURACY]) for r in run["metrics"] if ACCURACY in r]
    return {"reward": reward, "accuracy": accuracy, "wall": wall}


MISMATCH = "mismatch_logp_diff_mean"
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _moving_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_runs(runs: dict[str, dict[str, Any]], path: str, build: dict[str, Any]) -> None:
    """Reward and held-out accuracy against step (top) and against seconds of GRPO steps (bottom), and the
    train/inference log-prob gap against step (top right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(17, 8))
    for index, (name, run) in enumerate(runs.items()):
        color = PALETTE[index % len(PALETTE)]
        label = run.get("label") or name
        data = curves(run)
        for row, use_wall in enumerate((False, True)):
            for column, key in enumerate(("reward", "accuracy")):
                points = [(data["wall"].get(step) if use_wall else step, value) for step, value in data[key]]
                points = [(x, y) for x, y in points if x is not None]
                if not points:
                    continue
                xs, ys = zip(*points)
                axis = axes[row][column]
                if key == "reward" and len(ys) >= 5:
                    window = max(2, len(ys) // 10)
                    axis.plot(xs, ys, color=color, alpha=0.25)
                    axis.plot(xs, _moving_mean(list(ys), window), color=color, label=f"{label} (moving mean {window})")
                else:
                    axis.plot(xs, ys, color=color, marker="o" if key == "accuracy" else None, label=label)
        gap = [(r["step"], r[MISMATCH]) for r in run["metrics"] if isinstance(r.get(MISMATCH), (int, float))
               and r[MISMATCH] > 0]
        if gap:
            xs, ys = zip(*gap)
            axes[0][2].plot(xs, ys, color=color, label=label)
    sft_accuracy = build.get("heldout_greedy_accuracy")
    for row in range(2):
        if sft_accuracy is not None:
            axes[row][1].axhline(sft_accuracy, color="gray", linestyle=":", label="after fine-tuning (HF, bf16)")
        for column, (title, ylabel) in enumerate((("Reward (train batch)", "weighted reward"),
                                                  ("Held-out accuracy (greedy)", "exact match"))):
            axis = axes[row][column]
            axis.set(title=title, ylabel=ylabel,
                     xlabel="seconds of GRPO steps (evaluation left out)" if row else "step")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    axes[0][2].set(title="Train/inference gap: mean |Δ log-prob| per token", xlabel="step", yscale="log")
    axes[0][2].grid(alpha=0.3)
    if axes[0][2].lines:
        axes[0][2].legend(fontsize=8)
    axes[1][2].axis("off")
    figure.suptitle(f"GRPO on arithmetic: {build.get('parameters', 0) / 1e6:.3g}M-parameter Llama-3 model, "
                    f"{next(iter(runs.values())).get('device', '')}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _stats(records: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    if not values:
        return "n/a"
    return f"{values[0]:.3g} / {values[-1]:.3g} / {sum(values) / len(values):.3g}"


def markdown_table(runs: dict[str, dict[str, Any]], build: dict[str, Any]) -> str:
    engines = list(runs)
    rows: list[tuple[str, list[str]]] = []

    def add(name: str, values: list[str]) -> None:
        rows.append((name, values))

    def accuracy(run):
        points = curves(run)["accuracy"]
        if not points:
            return "n/a"
        first, last = points[0], points[-1]
        before = f"{first[1]:.3f}" + ("" if first[0] == 0 else f" (step {first[0]})")
        return f"{before} → {last[1]:.3f} ({last[1] - first[1]:+.3f})"

    add("held-out accuracy before → after", [accuracy(runs[e]) for e in engines])
    add("steps (stopped by budget)", [f"{runs[e].get('steps', '?')} ({runs[e].get('stopped_by_budget')})"
                                      for e in engines])
    add("framework, engine, dtype", [f"{runs[e].get('framework', 'rlcore')}, {runs[e].get('engine')}, "
                                     f"{runs[e].get('dtype', 'bfloat16')}" for e in engines])
    add("GRPO wall seconds", [f"{runs[e].get('grpo_seconds', float('nan')):.1f}" for e in engines])
    add("seconds of steps (evaluation left out)", [f"{runs[e].get('train_seconds', float('nan')):.1f}"
                                                   for e in engines])
    add("set-up seconds (engine start, model load)",
        [f"{runs[e].get('setup_seconds', float('nan')):.1f}"
         + (f" (vLLM init {runs[e]['engine_init_seconds']:.1f})" if runs[e].get("engine_init_seconds") else "")
         for e in engines])

    def reward_window(run, last: bool) -> str:
        values = [r["reward_mean"] for r in run["metrics"] if "reward_mean" in r]
        chunk = values[-10:] if last else values[:10]
        return f"{sum(chunk) / len(chunk):.3f}" if chunk else "n/a"

    add("reward, first 10 → last 10 steps", [f"{reward_window(runs[e], False)} → {reward_window(runs[e], True)}"
                                             for e in engines])
    for name in STEP_TIMES + ("step",):
        add(f"time_{name} mean s", [_mean(runs[e]["metrics"], f"time_{name}") for e in engines])
    for key in ("mismatch_logp_diff_mean", "mismatch_kl", "sampling_is_mean", "sampling_is_min", "sampling_is_max",
                "sampling_is_fraction_corrected", "completion_length_mean", "generation_tokens_per_second"):
        add(f"{key} first / last / mean", [_stats(runs[e]["metrics"], key) for e in engines])
    header = "| | " + " | ".join(engines) + " |\n| --- | " + " | ".join("---" for _ in engines) + " |"
    body = "\n".join(f"| {name} | " + " | ".join(values) + " |" for name, values in rows)
    first = next(iter(runs.values()))
    sampled = build.get("heldout_sampled") or {}
    sft = build.get("sft", {})
    notes = [(f"model: {build.get('parameters', 0) / 1e6:.1f}M parameters, fine-tuned {sft.get('steps')} steps in "
              f"{sft.get('seconds', float('nan')):.0f} s; after fine-tuning (HF, bf16): held-out greedy "
              f"{build.get('heldout_greedy_accuracy', float('nan')):.3f}, T=1 sampling mean "
              f"{sampled.get('mean', float('nan')):.3f}, pass@8 {sampled.get('pass@8', float('nan')):.3f}"),
             f"device: {first.get('device')}; versions: "
             + ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items() if v)]
    return header + "\n" + body + "\n\n" + "\n".join(f"- {n}" for n in notes)


def _mean(records: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return f"{sum(values) / len(values):.3f}" if values else "n/a"


if __name__ == "__main__":
    sys.exit(main())
