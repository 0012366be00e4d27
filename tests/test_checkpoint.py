"""Checkpoints survive a kill at every point of a save, re-save or rotation; damaged ones are detected and skipped.

Kills are injected deterministically: every file-system step a save takes (mkdir, each file write, fsync,
rename, delete) is counted on a first run, then each run k raises ``Killed`` (a BaseException, so no
``except Exception`` cleanup runs, as with a real kill) at step k, leaving a half-written file or a half-deleted
tree where the step writes or deletes. A subprocess test kills for real with ``os._exit``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from rlcore import checkpoint as ckpt
from rlcore.checkpoint import (CheckpointError, checkpoint_problem, list_checkpoints, load_trainer_state,
                               resolve_resume_path, save_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeAdapter:
    """Writes what a PEFT model writes: adapter_model.safetensors and adapter_config.json."""

    def __init__(self, marker: float, size: int = 256) -> None:
        self.tensor = torch.full((size,), float(marker))

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        save_file({"lora": self.tensor}, os.path.join(directory, "adapter_model.safetensors"))
        with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as handle:
            json.dump({"r": 1}, handle)


def save(output_dir, step, marker=None, limit=None, size=256):
    marker = step if marker is None else marker
    return save_checkpoint(str(output_dir), step, FakeAdapter(marker, size), None,
                           {"step": step, "blob": torch.full((size,), float(marker))}, {"grpo": {}}, limit)


def steps(output_dir) -> list[int]:
    return [int(os.path.basename(p).split("-")[1]) for p in list_checkpoints(str(output_dir))]


def marker_of(path) -> float:
    return float(load_trainer_state(path)["blob"][0])


def leftovers(output_dir) -> list[str]:
    return sorted(n for n in os.listdir(output_dir) if not ckpt.CHECKPOINT_PATTERN.match(n))


# ---------------------------------------------------------------------------------------------- kill injection
class Killed(BaseException):
    """A simulated kill -9: nothing after it runs, not even ``except Exception`` cleanup."""


@contextlib.contextmanager
def kill_at(index: int | None, counter: list):
    """Counts the file-system steps of the code inside; raises Killed at step ``index`` after doing a part
    of what that step does (half a file written, one file of a tree deleted)."""
    originals = {"replace": os.replace, "makedirs": os.makedirs, "rmtree": shutil.rmtree, "torch_save": torch.save,
                 "write_json": ckpt._write_json, "fsync": ckpt._fsync_path,
                 "adapter": FakeAdapter.save_pretrained}

    def step(name):
        counter.append(name)
        return index is not None and len(counter) - 1 == index

    def replace(src, dst):
        if step("replace"):
            raise Killed
        return originals["replace"](src, dst)

    def makedirs(path, *args, **kwargs):
        if step("makedirs"):
            raise Killed
        return originals["makedirs"](path, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        if step("rmtree"):
            for directory, _, files in os.walk(path):  # a delete killed after its first file
                if files:
                    os.remove(os.path.join(directory, files[0]))
                    break
            raise Killed
        return originals["rmtree"](path, *args, **kwargs)

    def torch_save(obj, file, *args, **kwargs):
        if step("torch_save"):
            originals["torch_save"](obj, file)
            with open(file, "r+b") as handle:
                handle.truncate(os.path.getsize(file) // 2)
            raise Killed
        return originals["torch_save"](obj, file, *args, **kwargs)

    def write_json(file, value):
        if step("write_json"):
            with open(file, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(value)[:10])
            raise Killed
        return originals["write_json"](file, value)

    def fsync(directory):
        if step("fsync"):
            raise Killed
        return originals["fsync"](directory)

    def adapter(self, directory):
        if step("adapter"):
            originals["adapter"](self, directory)
            file = os.path.join(directory, "adapter_model.safetensors")
            with open(file, "r+b") as handle:
                handle.truncate(os.path.getsize(file) // 2)
            raise Killed
        return originals["adapter"](self, directory)

    patches = [(os, "replace", replace), (os, "makedirs", makedirs), (shutil, "rmtree", rmtree),
               (torch, "save", torch_save), (ckpt, "_write_json", write_json), (ckpt, "_fsync_path", fsync),
               (FakeAdapter, "save_pretrained", adapter)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


# scenario: (checkpoints before, step saved, save_total_limit, steps that must survive any kill, steps after)
SCENARIOS = {
    "fresh save": ([1, 2], 3, None, {1, 2}, [1, 2, 3]),
    "re-save of an existing step": ([1, 2, 3], 2, None, {1, 2, 3}, [1, 2, 3]),
    "save with rotation": ([1, 2, 3], 4, 2, {3}, [3, 4]),
}


def _prepare(output_dir, before, limit):
    for step in before:
        save(output_dir, step, marker=step)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_kill_at_any_point_of_a_save_leaves_only_whole_checkpoints(tmp_path, scenario):
    before, step, limit, must_survive, after = SCENARIOS[scenario]
    counter: list = []
    _prepare(tmp_path / "count", before, limit)
    with kill_at(None, counter):
        save(tmp_path / "count", step, marker=100, limit=limit)
    assert {"makedirs", "adapter", "torch_save", "write_json", "fsync", "replace"} <= set(counter)
    assert ("rmtree" in counter) == (limit is not None or step in before)  # set-aside or rotated copies deleted
    for index in range(len(counter)):
        run = tmp_path / f"kill-{index}"
        _prepare(run, before, limit)
        with kill_at(index, []), pytest.raises(Killed):
            save(run, step, marker=100, limit=limit)
        where = f"killed at step {index} ({counter[index]})"
        # whatever is listed is whole; nothing that had to survive is gone
        for path in list_checkpoints(str(run)):
            assert checkpoint_problem(path) is None, where
        newest = resolve_resume_path(str(run), True, report=lambda line: None)
        assert newest is not None and checkpoint_problem(newest) is None, where
        assert must_survive <= set(steps(run)), (where, steps(run))
        # and the next save of the same step just works, leaving nothing behind
        save(run, step, marker=100, limit=limit)
        assert steps(run) == after, (where, steps(run))
        assert leftovers(run) == [], (where, leftovers(run))
        assert marker_of(os.path.join(run, f"checkpoint-{step}")) == 100.0, where
        for other in set(after) - {step}:
            assert marker_of(os.path.join(run, f"checkpoint-{other}")) == float(other), where


def test_leftovers_of_older_saves_never_block_a_save(tmp_path):
    save(tmp_path, 7)
    os.makedirs(tmp_path / "checkpoint-7.old" / "adapter")  # what rlcore 0.1.0 left when killed mid re-save
    os.makedirs(tmp_path / ".checkpoint-7.tmp" / "adapter")  # a temporary directory without manifest
    (tmp_path / ".checkpoint-7.tmp" / STATE).write_bytes(b"half")
    os.makedirs(tmp_path / ".checkpoint-3.deleting")
    save(tmp_path, 7, marker=70)
    assert steps(tmp_path) == [7] and leftovers(tmp_path) == []
    assert marker_of(tmp_path / "checkpoint-7") == 70.0


STATE = ckpt.STATE_FILE

KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from test_checkpoint import save
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == {kill_at}:
            os._exit(9)  # a real kill: no cleanup of any kind
        return real_replace(src, dst)

    os.replace = replace
    save({out!r}, 2, marker=200)
""")


@pytest.mark.parametrize("kill_at_rename", [1, 2])
def test_real_kill_between_the_renames_of_a_re_save(tmp_path, kill_at_rename):
    # rename 1 sets the old checkpoint-2 aside, rename 2 moves the new one in: in between there is no
    # checkpoint-2 at all; the next resume puts one back
    for step in (1, 2, 3):
        save(tmp_path, step)
    script = KILL_SCRIPT.format(tests=os.path.join(ROOT, "tests"), kill_at=kill_at_rename, out=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr[-2000:]
    assert 2 not in steps(tmp_path) or kill_at_rename == 1
    report: list[str] = []
    assert resolve_resume_path(str(tmp_path), True, report=report.append).endswith("checkpoint-3")
    assert steps(tmp_path) == [1, 2, 3] and leftovers(tmp_path) == []
    assert marker_of(tmp_path / "checkpoint-2") in (2.0, 200.0)
    if kill_at_rename == 2:
        assert report and "restored checkpoint-2" in report[0]


# ---------------------------------------------------------------------------------------------- damaged checkpoints
def _flip_byte(path, offset_from_end=10):
    data = bytearray(open(path, "rb").read())
    data[-offset_from_end] ^= 0x01
    open(path, "wb").write(bytes(data))


def _overwrite_with_random_bytes(path):
    size = os.path.getsize(path)
    with open(path, "wb") as handle:
        handle.write(os.urandom(size))


DAMAGE = {
    "state truncated": (STATE, lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 3), "truncated"),
    "state emptied": (STATE, lambda p: open(p, "wb").close(), "0 bytes"),
    "state random bytes": (STATE, lambda p: _overwrite_with_random_bytes(p), "does not match its checksum"),
    "adapter byte flipped": (ckpt.ADAPTER_WEIGHTS, _flip_byte, "does not match its checksum"),
    "adapter deleted": (ckpt.ADAPTER_WEIGHTS, os.remove, "is missing"),
    "manifest garbage": (ckpt.MANIFEST_FILE, lambda p: open(p, "w").write("{not json"), "unreadable"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_checkpoint_and_says_why(tmp_path, damage):
    name, corrupt, reason = DAMAGE[damage]
    for step in (1, 2, 3):
        save(tmp_path, step)
    corrupt(str(tmp_path / "checkpoint-3" / name))
    report: list[str] = []
    assert resolve_resume_path(str(tmp_path), True, report=report.append) == str(tmp_path / "checkpoint-2")
    assert len(report) == 1
    assert f"skipped {tmp_path / 'checkpoint-3'}: {name}" in report[0] and reason in report[0]
    assert "moved it to" in report[0] and os.path.isdir(tmp_path / "checkpoint-3.corrupt")
    assert steps(tmp_path) == [1, 2]
    # the damaged step is written again normally later
    save(tmp_path, 3, marker=30)
    assert steps(tmp_path) == [1, 2, 3]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_checkpoint_named_explicitly_is_verified(tmp_path, damage):
    name, corrupt, reason = DAMAGE[damage]
    path = save(tmp_path, 1)
    corrupt(os.path.join(path, name))
    with pytest.raises(CheckpointError) as caught:
        resolve_resume_path(str(tmp_path), path)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path} is damaged: {name}") and reason in message
    assert len(message) < 300


def test_unreadable_state_file_error_is_short_and_names_the_path(tmp_path):
    path = save(tmp_path, 1)
    with open(os.path.join(path, STATE), "wb") as handle:
        handle.write(os.urandom(300))
    with pytest.raises(CheckpointError, match=f"could not read {os.path.join(path, STATE)}") as caught:
        load_trainer_state(path)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert len(str(caught.value)) < 400


def test_no_intact_checkpoint_resumes_from_nothing_and_says_so(tmp_path):
    save(tmp_path, 1)
    os.remove(tmp_path / "checkpoint-1" / ckpt.MANIFEST_FILE)
    assert list_checkpoints(str(tmp_path)) == []  # no manifest: not a finished checkpoint
    assert resolve_resume_path(str(tmp_path), True, report=lambda line: None) is None
    with pytest.raises(CheckpointError, match="no manifest.json"):
        resolve_resume_path(str(tmp_path), str(tmp_path / "checkpoint-1"))
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_resume_path(str(tmp_path), str(tmp_path / "checkpoint-9"))


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    """Resuming checkpoint-2 of a run that went on to 6 starts a new branch: a kill early in it must resume the new
    branch (not the abandoned checkpoint-6), and rotation must keep the new branch's checkpoints."""
    for step in (2, 4, 6):
        save(tmp_path, step)
    lines = []
    assert resolve_resume_path(str(tmp_path), str(tmp_path / "checkpoint-2"), report=lines.append) \
        == str(tmp_path / "checkpoint-2")
    assert steps(tmp_path) == [2]
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".superseded")) == [
        "checkpoint-4.superseded", "checkpoint-6.superseded"]
    assert len(lines) == 2 and all("rename it back" in line for line in lines)
    assert marker_of(tmp_path / "checkpoint-6.superseded") == 6  # kept intact, nothing lost
    save(tmp_path, 3, marker=30, limit=2)  # the new branch goes on, with rotation
    assert steps(tmp_path) == [2, 3]
    assert marker_of(resolve_resume_path(str(tmp_path), True, report=lambda line: None)) == 30
    # branching again from 2 replaces the older set-aside copy of a step, not the new branch's
    save(tmp_path, 4, marker=40)
    resolve_resume_path(str(tmp_path), str(tmp_path / "checkpoint-2"), report=lambda line: None)
    assert marker_of(tmp_path / "checkpoint-4.superseded") == 40 and steps(tmp_path) == [2]


def test_resuming_a_checkpoint_from_another_directory_leaves_this_one_alone(tmp_path):
    other, here = tmp_path / "other", tmp_path / "here"
    save(other, 1)
    for step in (2, 3):
        save(here, step)
    resolve_resume_path(str(here), str(other / "checkpoint-1"), report=lambda line: None)
    assert steps(here) == [2, 3] and steps(other) == [1]


# ---------------------------------------------------------------------------------------------- a full disk
def test_full_disk_gives_one_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)
    real = ckpt._write_json

    def full_disk(file, value):
        if file.endswith("config.json"):
            raise OSError(errno.ENOSPC, "No space left on device", file)
        return real(file, value)

    monkeypatch.setattr(ckpt, "_write_json", full_disk)
    with pytest.raises(CheckpointError) as caught:
        save(tmp_path, 2)
    message = str(caught.value)
    assert message.startswith(f"could not write checkpoint-2 in {tmp_path}: no space left on the device (")
    assert "MiB free there now; the last checkpoint took" in message
    assert "Intact: checkpoint-1 (resume continues from checkpoint-1)" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # one error, not a chain
    assert leftovers(tmp_path) == [] and steps(tmp_path) == [1]
    monkeypatch.setattr(ckpt, "_write_json", real)
    save(tmp_path, 2)  # space back: the same save works
    assert steps(tmp_path) == [1, 2]


def test_manifest_lists_every_file_with_its_checksum(tmp_path):
    path = save(tmp_path, 5)
    manifest = json.loads(open(os.path.join(path, ckpt.MANIFEST_FILE)).read())
    assert manifest["step"] == 5
    on_disk = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files)
    assert sorted(manifest["files"]) == [n for n in on_disk if n != ckpt.MANIFEST_FILE]
    import hashlib

    for name, entry in manifest["files"].items():
        data = open(os.path.join(path, name), "rb").read()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
