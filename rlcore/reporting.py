"""What a run shows and keeps: a progress bar, per-step JSONL, TensorBoard / W&B when asked, a final plot.

``metrics.jsonl`` only ever grows by whole lines: each step's line goes out in one ``write`` on an append-only
file, and a write that fails part-way (full disk) is cut back to the previous line. A line cut short anyway
(a kill mid-write) is dropped with a warning naming the file and the line, by the reader and when the next run
opens the file. Resuming drops the lines after the checkpoint's step by truncating the file (one system call)
or, when something other than a tail has to go, by writing a new file and renaming it over the old one: the
file is never rewritten in place. The plot is written to a temporary file and renamed, so there is never a
half-written PNG. In a job of several processes (torchrun) rank 0 alone reports, the job's metrics
(:func:`rlcore.distributed.combine_metrics`); the other ranks get a :class:`SilentReporter`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("rlcore")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
# the stacked time split, bottom to top: the phases of one step (reference: β > 0 log-probs at rollout time)
TIME_PHASES = ("generate", "standby", "reward", "reference", "train", "sync")


class MetricsWriteError(RuntimeError):
    """A step's metrics line could not be written (e.g. a full disk); the file keeps every earlier line."""


class RunReporter:
    """Writes one JSON line per optimizer step to ``output_dir/metrics.jsonl`` and drives the progress bar."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int = 0, report_to: list[str] | None = None,
                 logging_steps: int = 1, config: dict[str, Any] | None = None, show_progress: bool = True) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.logging_steps = logging_steps
        keep_metrics_through(self.path, start_step)
        self._descriptor: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._writers = _open_writers(report_to or [], output_dir, config or {})
        self._bar = None
        if show_progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="GRPO", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        append_line(self._descriptor, (json.dumps(record) + "\n").encode("utf-8"), self.path, step)
        for writer in self._writers:
            writer(step, record)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if step % self.logging_steps == 0:
                self._bar.set_postfix(_summary(record), refresh=False)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> str | None:
        """Closes outputs and writes the plot; returns its path, or None if there was nothing or it failed.

        Never raises for the plot: it runs after an error too, and must not bury it under a second one.
        """
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        if self._bar is not None:
            self._bar.close()
        for writer in self._writers:
            close = getattr(writer, "close", None)
            if close:
                close()
        return plot_metrics(self.path, os.path.join(self.output_dir, PLOT_FILE))


class SilentReporter:
    """What the ranks other than 0 of a torchrun job report: nothing (rank 0 writes the metrics of the whole
    job, the plot and the progress bar). Same methods as :class:`RunReporter`."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, METRICS_FILE)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> str | None:
        return None


# ---------------------------------------------------------------------------------------------- the JSONL file
def append_line(descriptor: int, line: bytes, path: str, step: int | None = None) -> None:
    """Appends ``line`` whole or not at all: a failed write is cut back to where the file ended before."""
    end = os.lseek(descriptor, 0, os.SEEK_END)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(descriptor, view):]
    except OSError as error:
        try:
            os.ftruncate(descriptor, end)
        except OSError:
            pass  # the reader drops a cut-short last line
        what = f"step {step}'s metrics" if step is not None else "a line"
        raise MetricsWriteError(f"could not append {what} to {path}: {error.strerror or error} "
                                f"({_free_space(path)}); every earlier step is intact") from None


def keep_metrics_through(path: str, step: int) -> None:
    """Leaves in ``path`` only the whole, valid lines with ``"step" <= step`` (a resumed run rewrites the rest).

    Damaged lines are dropped with a warning naming the file and line. When what stays is the start of the
    file, the rest is cut off with one truncate; otherwise a new file is written and renamed over the old one.
    """
    temporary = path + ".tmp"
    if os.path.exists(temporary):  # left by a run killed while rewriting; the file itself is whole
        os.remove(temporary)
    if not os.path.isfile(path):
        return
    with open(path, "rb") as handle:
        data = handle.read()
    kept, prefix_end, is_prefix = [], 0, True
    for number, (start, end, raw) in enumerate(_lines(data), start=1):
        record = _parse_line(raw, path, number, warn=True)
        keep = record is not None and _step_of(record) <= step
        if keep:
            kept.append(raw)
            if is_prefix:
                prefix_end = end
        else:
            is_prefix = False
    if is_prefix and prefix_end == len(data):
        return
    if b"".join(kept) == data[:prefix_end]:
        os.truncate(path, prefix_end)
        return
    try:
        with open(temporary, "wb") as handle:
            handle.write(b"".join(kept))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise MetricsWriteError(f"could not rewrite {path} (dropping steps after {step}): "
                                f"{error.strerror or error} ({_free_space(path)}); the file is unchanged") from None


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Every valid record of a metrics file; a damaged line is dropped with a warning naming the file and line."""
    with open(path, "rb") as handle:
        data = handle.read()
    records = []
    for number, (_, _, raw) in enumerate(_lines(data), start=1):
        record = _parse_line(raw, path, number, warn=True)
        if record is not None:
            records.append(record)
    return records


def _lines(data: bytes):
    """(start, end, bytes) of each non-blank line, newline included; a last line without a newline is returned
    as it is (the parser calls it cut short)."""
    start = 0
    while start < len(data):
        newline = data.find(b"\n", start)
        end = len(data) if newline < 0 else newline + 1
        if data[start:end].strip():
            yield start, end, data[start:end]
        start = end


def _parse_line(raw: bytes, path: str, number: int, warn: bool) -> dict[str, Any] | None:
    problem = None
    if not raw.endswith(b"\n"):
        problem = "is cut short (no newline: a kill or a full disk mid-write)"
    else:
        try:
            record = json.loads(raw.decode("utf-8"))
            if isinstance(record, dict):
                return record
            problem = f"is a JSON {type(record).__name__}, not an object"
        except (UnicodeDecodeError, ValueError) as error:
            problem = f"is not valid JSON ({error})"
    if warn:
        logger.warning("%s line %d %s; dropped it", path, number, problem)
    return None


def _step_of(record: dict[str, Any]) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf


def _free_space(path: str) -> str:
    import shutil

    try:
        return f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20:,.1f} MiB free there"
    except OSError:
        return "free space unknown"


# ---------------------------------------------------------------------------------------------- the plot
@dataclass
class Series:
    label: str
    steps: list[int]
    values: list[float]  # NaN where the step has no usable value (drawn as a gap)
    style: str = "line"  # "line", "dashed" (a smoothed copy), "points" (sparse, e.g. evaluation)
    spread: list[float] | None = None  # ± band around the values (reward std)


@dataclass
class Panel:
    title: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    stacked: bool = False
    legend: bool = True


def metric_panels(records: list[dict[str, Any]]) -> list[Panel]:
    """The panels of the training plot, each with only the series the records have (a panel with none is
    left out). Values that are missing, non-numeric or ``"nan"`` strings become NaN gaps."""
    steps = [int(r["step"]) for r in records]

    def series(key: str, label: str, style: str = "line", spread_key: str | None = None) -> Series | None:
        values = [_number(r.get(key)) for r in records]
        if all(math.isnan(v) for v in values):
            return None
        spread = [_number(r.get(spread_key)) for r in records] if spread_key else None
        if style == "points":  # only the steps that have it
            present = [i for i, v in enumerate(values) if not math.isnan(v)]
            return Series(label, [steps[i] for i in present], [values[i] for i in present], style)
        return Series(label, steps, values, style, spread)

    keys = sorted({k for r in records for k in r})
    panels = []

    reward = [series("reward_mean", "mean", spread_key="reward_std")]
    if reward[0] is not None and len(records) >= 5:
        window = max(2, len(records) // 10)
        reward.append(Series(f"moving mean ({window} steps)", steps, moving_mean(reward[0].values, window),
                             "dashed"))
    panels.append(Panel("Reward", "reward", reward))
    per_reward = [k for k in keys if k.startswith("rewards/") and k.endswith("/mean")]
    panels.append(Panel("Reward per function (mean)", "reward",
                        [series(k, k[len("rewards/"):-len("/mean")]) for k in per_reward]))
    evaluation = [k for k in keys if k == "eval_reward_mean" or k.startswith("eval_rewards/")]
    panels.append(Panel("Evaluation (greedy)", "reward",
                        [series(k, "reward" if k == "eval_reward_mean" else k[len("eval_rewards/"):], "points")
                         for k in evaluation]))
    panels.append(Panel("Loss", "loss", [series("loss", "loss")], legend=False))
    panels.append(Panel("KL to the reference", "KL", [series("kl", "kl")], legend=False))
    panels.append(Panel("Train/inference mismatch", "per token",
                        [series("mismatch_logp_diff_mean", "mean |Δ log p|"), series("mismatch_kl", "KL")]))
    clip = [k for k in keys if k.startswith("clip_ratio") or k == "cispo_clip_ratio"]
    panels.append(Panel("Clipped fraction", "fraction of tokens",
                        [series(k, k.replace("clip_ratio_", "").replace("_", " ")) for k in clip]))
    time_split = []
    for phase in TIME_PHASES:
        found = series(f"time_{phase}", phase)
        if found is not None:
            found.values = [0.0 if math.isnan(v) else v for v in found.values]  # a stack has no gaps
            time_split.append(found)
    panels.append(Panel("Time per step", "seconds", time_split, stacked=True))
    panels.append(Panel("Completion length", "tokens",
                        [series("completion_length_mean", "mean"), series("completion_length_max", "max", "dashed"),
                         series("completion_length_min", "min", "dashed")]))
    for panel in panels:
        panel.series = [s for s in panel.series if s is not None]
    return [p for p in panels if p.series]


def moving_mean(values: list[float], window: int) -> list[float]:
    """m_i = mean of the non-NaN values among values[i - window + 1 .. i] (NaN if there are none)."""
    out = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i - window + 1):i + 1] if not math.isnan(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def plot_metrics(metrics_path: str, plot_path: str) -> str | None:
    """Draws :func:`metric_panels` of a metrics file as a PNG, written atomically; returns its path, or None
    when there is nothing to draw or drawing/writing failed (logged as a warning, never raised)."""
    temporary = plot_path + ".tmp"
    try:
        records = [r for r in read_metrics(metrics_path) if isinstance(r.get("step"), int)] \
            if os.path.isfile(metrics_path) else []
        panels = metric_panels(records)
        if not panels:
            return None
        figure = _draw(panels)
        with open(temporary, "wb") as handle:
            figure.savefig(handle, format="png", dpi=90)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, plot_path)
        return plot_path
    except Exception as error:  # the plot is a convenience: report, keep going
        try:
            os.remove(temporary)
        except OSError:
            pass
        logger.warning("plot %s not written: %s: %s", plot_path, type(error).__name__, error)
        return None


def _draw(panels: list[Panel]):
    from matplotlib.figure import Figure  # no pyplot: no global backend switch, works without a display
    from matplotlib.ticker import MaxNLocator

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5.2 * columns, 3.6 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, panel in zip(axes, panels):
        if panel.stacked:
            axis.stackplot(panel.series[0].steps, *[s.values for s in panel.series],
                           labels=[s.label for s in panel.series], alpha=0.8)
        for s in ([] if panel.stacked else panel.series):
            if s.style == "points":
                axis.plot(s.steps, s.values, "o-", label=s.label)
            else:
                axis.plot(s.steps, s.values, "--" if s.style == "dashed" else "-", label=s.label,
                          alpha=0.7 if s.style == "dashed" else 1.0)
            if s.spread is not None:
                low = [v - d for v, d in zip(s.values, s.spread)]
                high = [v + d for v, d in zip(s.values, s.spread)]
                axis.fill_between(s.steps, low, high, alpha=0.2, label="± std")
        axis.set(xlabel="step", ylabel=panel.ylabel, title=panel.title)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        if panel.legend:
            axis.legend(fontsize="small")
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    return figure


def _number(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # non-finite values are stored as "nan" / "inf" strings
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


# ---------------------------------------------------------------------------------------------- progress, writers
def _summary(record: dict[str, Any]) -> dict[str, str]:
    shown = {"reward": "reward_mean", "kl": "kl", "tok/s": "tokens_per_second", "loss": "loss"}
    return {label: _short(record[key]) for label, key in shown.items() if key in record}


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep it visible as a string
    return value


def _open_writers(report_to: list[str], output_dir: str, config: dict[str, Any]) -> list:
    writers = []
    if "tensorboard" in report_to:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ValueError("report_to includes 'tensorboard' but tensorboard is not installed "
                             "(pip install tensorboard)") from error
        board = SummaryWriter(os.path.join(output_dir, "tensorboard"))

        def write_board(step: int, record: dict[str, Any]) -> None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    board.add_scalar(key, value, step)

        write_board.close = board.close  # type: ignore[attr-defined]
        writers.append(write_board)
    if "wandb" in report_to:
        try:
            import wandb
        except ImportError as error:
            raise ValueError("report_to includes 'wandb' but wandb is not installed (pip install wandb)") from error
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlcore"), config=config)

        def write_wandb(step: int, record: dict[str, Any]) -> None:
            run.log({k: v for k, v in record.items() if k != "step"}, step=step)

        write_wandb.close = run.finish  # type: ignore[attr-defined]
        writers.append(write_wandb)
    return writers
