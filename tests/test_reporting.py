"""metrics.jsonl holds only whole lines through kills and full disks; resume never rewrites it in place; the plot
is drawn from whatever the records hold and is written atomically."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os

import pytest

from rlcore import reporting
from rlcore.reporting import (MetricsWriteError, RunReporter, keep_metrics_through, metric_panels, plot_metrics,
                              read_metrics)


def lines(*steps: int) -> bytes:
    return b"".join(json.dumps({"step": s, "reward_mean": s / 10}).encode() + b"\n" for s in steps)


def test_a_cut_short_line_is_dropped_with_a_warning_naming_file_and_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(1, 2) + b'{"step": 3, "reward_me')  # a kill mid-write
    with caplog.at_level(logging.WARNING, logger="rlcore"):
        assert [r["step"] for r in read_metrics(str(path))] == [1, 2]
    assert f"{path} line 3 is cut short" in caplog.text


def test_a_damaged_line_in_the_middle_is_dropped_not_fatal(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    # what an older run left: a half line, then a resumed run's line appended right after it
    path.write_bytes(lines(1) + b'{"step": 2, "rew' + lines(2, 3))
    with caplog.at_level(logging.WARNING, logger="rlcore"):
        assert [r["step"] for r in read_metrics(str(path))] == [1, 3]
    assert f"{path} line 2 is not valid JSON (Expecting" in caplog.text


def test_reporter_repairs_a_cut_short_file_before_appending(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(1, 2) + b'{"step": 3, "rew')
    with caplog.at_level(logging.WARNING, logger="rlcore"):
        reporter = RunReporter(str(tmp_path), 5, start_step=2, show_progress=False)
        reporter.log(3, {"reward_mean": 0.3})
        reporter.close()
    assert path.read_bytes() == lines(1, 2) + json.dumps({"step": 3, "reward_mean": 0.3}).encode() + b"\n"
    assert f"{path} line 3 is cut short" in caplog.text


class Killed(BaseException):
    pass


@contextlib.contextmanager
def kill_on(names: list[str], index: int | None, counter: list):
    """Raises Killed at the index-th call of any of the named os functions or of an ``open`` for writing
    (before it acts); an ``open`` for writing is recorded with the path it opens."""
    import builtins

    originals = {name: getattr(os, name) for name in names}
    real_open = builtins.open

    def wrap(name):
        def wrapper(*args, **kwargs):
            counter.append(name)
            if index is not None and len(counter) - 1 == index:
                raise Killed
            return originals[name](*args, **kwargs)
        return wrapper

    def open_(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            counter.append(f"open for writing {os.path.basename(os.fspath(file))}")
            if index is not None and len(counter) - 1 == index:
                raise Killed
        return real_open(file, mode, *args, **kwargs)

    for name in names:
        setattr(os, name, wrap(name))
    builtins.open = open_
    try:
        yield
    finally:
        builtins.open = real_open
        for name, original in originals.items():
            setattr(os, name, original)


MUTATING = ["truncate", "ftruncate", "replace", "rename", "remove", "unlink", "fsync"]


@pytest.mark.parametrize("content", [lines(1, 2, 3, 4, 5, 6), lines(1, 2) + b'{"step": 3, "x' + lines(3, 4, 5)],
                         ids=["tail dropped", "damaged line in the middle"])
def test_resume_never_loses_kept_steps_whatever_the_kill_point(tmp_path, content):
    counter: list = []
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    with kill_on(MUTATING, None, counter):
        keep_metrics_through(str(path), 2)
    assert path.read_bytes() == lines(1, 2)
    assert counter and "open for writing metrics.jsonl" not in counter  # never rewritten in place
    for index in range(len(counter)):
        run = tmp_path / f"kill-{index}"
        run.mkdir()
        path = run / "metrics.jsonl"
        path.write_bytes(content)
        with kill_on(MUTATING, index, []), pytest.raises(Killed):
            keep_metrics_through(str(path), 2)
        data = path.read_bytes()
        assert data in (content, lines(1, 2)), (index, counter[index], data)  # all or nothing
        keep_metrics_through(str(path), 2)  # the next start finishes the job
        assert path.read_bytes() == lines(1, 2)
        assert os.listdir(run) == ["metrics.jsonl"]


def test_keeping_a_prefix_is_one_truncate(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(1, 2, 3, 4))
    calls = []
    monkeypatch.setattr(os, "replace", lambda *a: calls.append("replace"))
    real_truncate = os.truncate
    monkeypatch.setattr(os, "truncate", lambda *a: (calls.append("truncate"), real_truncate(*a)))
    keep_metrics_through(str(path), 3)
    assert calls == ["truncate"] and path.read_bytes() == lines(1, 2, 3)


def test_full_disk_while_appending_leaves_whole_lines(tmp_path, monkeypatch):
    reporter = RunReporter(str(tmp_path), 5, show_progress=False)
    reporter.log(1, {"reward_mean": 0.1})
    real_write = os.write
    calls = []

    def half_then_full(descriptor, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(descriptor, bytes(data[:len(data) // 2]))  # a short write...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk is full

    monkeypatch.setattr(reporting.os, "write", half_then_full)
    with pytest.raises(MetricsWriteError, match=rf"could not append step 2's metrics to {tmp_path}/metrics.jsonl: "
                                                r"No space left on device \(.* MiB free there\)"):
        reporter.log(2, {"reward_mean": 0.2, "padding": "x" * 200})
    monkeypatch.setattr(reporting.os, "write", real_write)
    assert (tmp_path / "metrics.jsonl").read_bytes() == json.dumps({"step": 1, "reward_mean": 0.1}).encode() + b"\n"
    reporter.log(2, {"reward_mean": 0.2})  # space back: logging goes on
    reporter.close()
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2]


# ---------------------------------------------------------------------------------------------- the plot
def records_with_everything(n: int = 8) -> list[dict]:
    out = []
    for step in range(1, n + 1):
        out.append({"step": step, "reward_mean": step / n, "reward_std": 0.1, "rewards/correct/mean": 0.5,
                    "rewards/format/mean": "nan", "loss": 0.1, "kl": 0.01, "mismatch_logp_diff_mean": 1e-3,
                    "mismatch_kl": 1e-5, "clip_ratio_low": 0.0, "clip_ratio_high": 0.2, "time_generate": 2.0,
                    "time_reward": 0.1, "time_train": 1.5, "time_sync": 0.01, "time_standby": 0.2,
                    "completion_length_mean": 30, "completion_length_max": 64, "completion_length_min": 3,
                    **({"eval_reward_mean": 0.4, "eval_rewards/correct": 0.3} if step % 4 == 0 else {})})
    return out


def test_panels_show_every_metric_group():
    panels = {p.title: p for p in metric_panels(records_with_everything())}
    assert list(panels) == ["Reward", "Reward per function (mean)", "Evaluation (greedy)", "Loss",
                            "KL to the reference", "Train/inference mismatch", "Clipped fraction", "Time per step",
                            "Completion length"]
    reward = panels["Reward"].series
    assert [s.label for s in reward] == ["mean", "moving mean (2 steps)"]
    assert reward[0].values == [s / 8 for s in range(1, 9)]  # the raw mean is drawn, not only the smoothed one
    assert reward[1].values[1] == pytest.approx((1 / 8 + 2 / 8) / 2)
    assert [s.label for s in panels["Reward per function (mean)"].series] == ["correct"]  # all-NaN: left out
    evaluation = panels["Evaluation (greedy)"].series
    assert [(s.label, s.steps) for s in evaluation] == [("reward", [4, 8]), ("correct", [4, 8])]
    time_split = panels["Time per step"]
    assert time_split.stacked and [s.label for s in time_split.series] == ["generate", "standby", "reward", "train",
                                                                          "sync"]
    assert [s.label for s in panels["Train/inference mismatch"].series] == ["mean |Δ log p|", "KL"]


def test_panels_cope_with_missing_keys_nan_and_strings():
    records = [{"step": 1, "reward_mean": "nan"}, {"step": 2, "reward_mean": 0.5, "loss": "inf"},
               {"step": 3, "reward_mean": None, "loss": True, "time_train": 1.0}]
    panels = {p.title: p for p in metric_panels(records)}
    assert list(panels) == ["Reward", "Loss", "Time per step"]
    assert [str(v) for v in panels["Reward"].series[0].values] == ["nan", "0.5", "nan"]
    assert panels["Loss"].series[0].values[1] == math.inf and math.isnan(panels["Loss"].series[0].values[2])
    assert metric_panels([{"step": 1}]) == []


def test_plot_has_integer_step_ticks_and_is_a_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records_with_everything(3)))
    out = plot_metrics(str(path), str(tmp_path / "plot.png"))
    assert out == str(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = reporting._draw(metric_panels(records_with_everything(3)))
    for axis in figure.axes:
        if axis.get_visible():
            ticks = [t for t in axis.get_xticks() if 1 <= t <= 3]
            assert ticks and all(float(t).is_integer() for t in ticks), axis.get_title()


def test_a_failed_plot_write_leaves_no_partial_png_and_keeps_the_old_one(tmp_path, monkeypatch, caplog):
    from matplotlib.figure import Figure

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records_with_everything(3)))
    (tmp_path / "plot.png").write_bytes(b"previous plot")

    def full_disk(self, handle, **kwargs):
        handle.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with caplog.at_level(logging.WARNING, logger="rlcore"):
        assert plot_metrics(str(path), str(tmp_path / "plot.png")) is None
    assert (tmp_path / "plot.png").read_bytes() == b"previous plot"
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "plot.png"]
    assert "plot.png not written: OSError" in caplog.text
