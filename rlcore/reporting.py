"""What a run shows and keeps: a progress bar, per-step JSONL, TensorBoard / W&B when asked, a final plot."""

from __future__ import annotations

import json
import math
import os
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"


class RunReporter:
    """Writes one JSON line per optimizer step to ``output_dir/metrics.jsonl`` and drives the progress bar."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int = 0, report_to: list[str] | None = None,
                 logging_steps: int = 1, config: dict[str, Any] | None = None, show_progress: bool = True) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.logging_steps = logging_steps
        self._truncate_after(start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._writers = _open_writers(report_to or [], output_dir, config or {})
        self._bar = None
        if show_progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="GRPO", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        # A resumed run rewrites the steps after its checkpoint; drop the stale lines so each step appears once.
        if not os.path.isfile(self.path):
            return
        kept = [line for line in open(self.path, encoding="utf-8")
                if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(kept)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
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
        """Closes outputs and writes the reward / completion-length plot; returns the plot's path."""
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        for writer in self._writers:
            close = getattr(writer, "close", None)
            if close:
                close()
        return plot_metrics(self.path, os.path.join(self.output_dir, PLOT_FILE))


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_metrics(metrics_path: str, plot_path: str) -> str | None:
    """Reward mean (± std) and completion length per step, as a PNG."""
    records = [r for r in read_metrics(metrics_path) if "reward_mean" in r] if os.path.isfile(metrics_path) else []
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    figure, (reward_axis, length_axis) = plt.subplots(1, 2, figsize=(11, 4))
    mean = [r["reward_mean"] for r in records]
    std = [r.get("reward_std", 0.0) for r in records]
    reward_axis.plot(steps, mean, label="reward mean")
    reward_axis.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                             alpha=0.2, label="± std")
    if len(mean) >= 5:
        window = max(2, len(mean) // 10)
        smooth = [sum(mean[max(0, i - window + 1):i + 1]) / len(mean[max(0, i - window + 1):i + 1])
                  for i in range(len(mean))]
        reward_axis.plot(steps, smooth, label=f"moving mean ({window})")
    reward_axis.set(xlabel="step", ylabel="reward", title="Reward")
    reward_axis.legend()
    length_axis.plot(steps, [r.get("completion_length_mean", 0) for r in records], label="mean")
    length_axis.plot(steps, [r.get("completion_length_max", 0) for r in records], label="max", alpha=0.5)
    length_axis.plot(steps, [r.get("completion_length_min", 0) for r in records], label="min", alpha=0.5)
    length_axis.set(xlabel="step", ylabel="tokens", title="Completion length")
    length_axis.legend()
    figure.tight_layout()
    figure.savefig(plot_path, dpi=100)
    plt.close(figure)
    return plot_path


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
