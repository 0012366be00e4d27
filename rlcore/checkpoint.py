"""Crash-safe checkpoints: LoRA adapter (PEFT format), optimizer, scheduler, RNG states, step, config, rollout buffer.

A job of several processes (torchrun) has rank 0 write one checkpoint holding every rank's RNG state and share
of the rollout buffer (:func:`with_rank_states`); each rank resumes its own (:func:`rank_state`).

``output_dir/checkpoint-N/`` holds ``adapter/``, ``trainer_state.pt``, ``config.json`` and ``manifest.json``,
the size and sha256 of every other file. How each step of a save survives a kill (or a full disk):

1. everything is written into ``.checkpoint-N.tmp`` and fsynced; ``manifest.json`` is written last, so a
   directory without a valid manifest is an unfinished save and is never used;
2. the directory is renamed to ``checkpoint-N``; re-saving a step first renames the old one aside
   (``.checkpoint-N.replaced``), so there is never a moment with a half checkpoint under a checkpoint name;
3. ``save_total_limit`` renames each old checkpoint to ``.checkpoint-N.deleting`` before deleting it, so a
   kill mid-delete leaves no half-deleted ``checkpoint-N``.

Leftovers of a killed save (steps 1–3) are tidied by :func:`recover_output_dir` at the next save or resume: a
finished temporary or set-aside directory whose step has no checkpoint is put back, anything else is removed.
Loading verifies every file against the manifest; resuming with ``True`` falls back to the newest checkpoint
that verifies and moves a damaged one aside to ``checkpoint-N.corrupt`` (kept for inspection; a later damaged
copy of the same step replaces it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("rlcore")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LEFTOVER_PATTERN = re.compile(r"^\.checkpoint-(\d+)\.(tmp|replaced|deleting)$")
LEGACY_SET_ASIDE = re.compile(r"^checkpoint-(\d+)\.old$")
SUPERSEDED_SUFFIX = ".superseded"  # a later checkpoint set aside when an earlier one is resumed explicitly  # what rlcore 0.1.0 left when killed mid re-save
STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = os.path.join(ADAPTER_DIR, "adapter_model.safetensors")
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_HASH_BLOCK = 1 << 20
_NEARLY_FULL = 1 << 20  # bytes free below which a failed write is put down to a full disk


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and what is still intact."""


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- several processes
# what each process of a torchrun job keeps for itself: its random streams and its share of the rollout buffer
RANK_KEYS = ("rng", "buffers")


def with_rank_states(state: dict[str, Any], per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The trainer state of a job of W processes, written by rank 0: rank 0's :data:`RANK_KEYS` where one process
    keeps them, every other rank's in ``other_ranks`` (rank 1 first), and ``world_size``. One process: ``state``
    unchanged (the file then has exactly the one-process layout)."""
    if len(per_rank) == 1:
        return state
    return {**state, **per_rank[0], "world_size": len(per_rank), "other_ranks": list(per_rank[1:])}


def rank_state(state: dict[str, Any], rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Rank ``rank``'s :data:`RANK_KEYS` from a checkpoint's trainer state.

    Raises :class:`CheckpointError` when the checkpoint was written by a job of another size: each process's
    rollout buffer holds its own share of a generation, so the shares cannot be dealt out again.
    """
    saved = state.get("world_size", 1)
    if saved != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved} process{'es' if saved != 1 else ''} and this job has "
            f"{world_size}: resume it with {saved} (torchrun --nproc_per_node {saved}), since each process's random "
            "state and share of the rollout buffer are in it, or start a new run from its adapter "
            "(ModelConfig(lora_adapter_path=.../adapter))")
    if rank == 0:
        return {key: state[key] for key in RANK_KEYS}
    return state["other_ranks"][rank - 1]


# ---------------------------------------------------------------------------------------------- saving
def save_checkpoint(output_dir: str, step: int, model, tokenizer, trainer_state: dict[str, Any],
                    configs: dict[str, Any], save_total_limit: int | None = None) -> str:
    """Writes ``output_dir/checkpoint-{step}`` so that a kill at any point leaves only whole checkpoints.

    Returns its path. A failed write (e.g. a full disk) removes what this save wrote and raises one
    :class:`CheckpointError` naming the path, the free space and the checkpoints still intact.
    """
    os.makedirs(output_dir, exist_ok=True)
    for line in recover_output_dir(output_dir):
        logger.warning(line)
    name = f"checkpoint-{step}"
    final = os.path.join(output_dir, name)
    temporary = os.path.join(output_dir, f".{name}.tmp")
    try:
        os.makedirs(temporary)
        model.save_pretrained(os.path.join(temporary, ADAPTER_DIR))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(temporary, ADAPTER_DIR))
        torch.save(trainer_state, os.path.join(temporary, STATE_FILE))
        _write_json(os.path.join(temporary, "config.json"), configs)
        _fsync_tree(temporary)
        _write_json(os.path.join(temporary, MANIFEST_FILE), _manifest(temporary, step))  # last: marks it whole
        _fsync_path(temporary)
    except Exception as error:  # not BaseException: a simulated kill must leave the directory as a kill would
        disk_error = _is_disk_error(error, output_dir)  # before the cleanup frees the space again
        _remove_tree(temporary)
        raise CheckpointError(_write_failure(output_dir, name, error, disk_error)) from (None if disk_error
                                                                                       else error)
    if os.path.isdir(final):
        # Re-saving a step (e.g. after resuming from an earlier one): set the old copy aside, then swap in.
        set_aside = os.path.join(output_dir, f".{name}.replaced")
        os.replace(final, set_aside)
        os.replace(temporary, final)
        _fsync_path(output_dir)
        _remove_tree(set_aside)
    else:
        os.replace(temporary, final)
        _fsync_path(output_dir)
    if save_total_limit:
        older = [path for path in list_checkpoints(output_dir) if path != final]
        for path in older[:max(0, len(older) - (save_total_limit - 1))]:
            delete_checkpoint(path)
    return final


def delete_checkpoint(path: str) -> None:
    """Removes a checkpoint so that a kill mid-way leaves no partial ``checkpoint-N``: rename, then delete."""
    parent, name = os.path.split(os.path.normpath(path))
    doomed = os.path.join(parent, f".{name}.deleting")
    os.replace(path, doomed)
    _fsync_path(parent)
    _remove_tree(doomed)


def recover_output_dir(output_dir: str) -> list[str]:
    """Tidies what a killed save or delete left in ``output_dir``; returns one line per thing it changed.

    A finished ``.checkpoint-N.tmp`` (valid manifest) or ``.checkpoint-N.replaced`` whose step has no
    ``checkpoint-N`` is renamed into place (the temporary one first: it is the newer save); every other
    leftover is deleted. Checkpoints themselves are never touched.
    """
    if not os.path.isdir(output_dir):
        return []
    report = []
    names = sorted(os.listdir(output_dir), key=lambda n: (0 if n.endswith(".tmp") else 1, n))
    for name in names:
        path = os.path.join(output_dir, name)
        match = LEFTOVER_PATTERN.match(name)
        if match and os.path.isdir(path):
            step, kind = int(match.group(1)), match.group(2)
            final = os.path.join(output_dir, f"checkpoint-{step}")
            if kind in ("tmp", "replaced") and not os.path.exists(final) and checkpoint_problem(path) is None:
                os.replace(path, final)
                _fsync_path(output_dir)
                report.append(f"restored checkpoint-{step} from {name}, which an interrupted save left")
            else:
                _remove_tree(path)
                report.append(f"removed {name}, left by an interrupted save or delete")
            continue
        legacy = LEGACY_SET_ASIDE.match(name)
        if legacy and os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, f"checkpoint-{legacy.group(1)}")):
            _remove_tree(path)
            report.append(f"removed {name}, left by an interrupted re-save")
    return report


# ---------------------------------------------------------------------------------------------- listing, checking
def list_checkpoints(output_dir: str) -> list[str]:
    """Finished checkpoints in ``output_dir`` (those with a manifest), oldest first. Does not read the files."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, MANIFEST_FILE)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_problem(path: str) -> str | None:
    """None when every file of the checkpoint at ``path`` matches its manifest, else what is wrong (one line)."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isdir(path):
        return "not a directory"
    if not os.path.isfile(manifest_path):
        return f"no {MANIFEST_FILE} (an unfinished save, or written by hand or by an older rlcore)"
    try:
        with open(manifest_path, "rb") as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or STATE_FILE not in files:
            raise ValueError("unexpected content")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST_FILE} is unreadable ({error})"
    for relative, expected in sorted(files.items()):
        file = os.path.join(path, relative)
        if not os.path.isfile(file):
            return f"{relative} is missing"
        size = os.path.getsize(file)
        if size != expected["bytes"]:
            return f"{relative} is {size:,} bytes, expected {expected['bytes']:,} (truncated or overwritten)"
        if _sha256(file) != expected["sha256"]:
            return f"{relative} does not match its checksum (corrupted)"
    return None


def verify_checkpoint(path: str) -> None:
    """Raises :class:`CheckpointError` naming the path and the damaged file unless the checkpoint is intact."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")


def resolve_resume_path(output_dir: str, resume_from_checkpoint: bool | str | None,
                        report: Callable[[str], None] | None = None) -> str | None:
    """The checkpoint to resume from, verified against its manifest.

    ``True`` → the newest intact checkpoint in ``output_dir`` (None if there is none); each newer damaged one
    is reported (``report``, default: a logged warning) and moved aside to ``checkpoint-N.corrupt``.
    A path → that checkpoint, or :class:`CheckpointError` if it is not an intact one (no silent fallback
    from a checkpoint chosen by name).
    """
    report = report or logger.warning
    if not resume_from_checkpoint:
        return None
    for line in recover_output_dir(output_dir):
        report(line)
    if resume_from_checkpoint is True:
        for path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            aside = path + ".corrupt"
            if os.path.exists(aside):  # an older damaged copy of the same step: the newer one is kept instead
                _remove_tree(aside)
            os.replace(path, aside)
            report(f"skipped {path}: {problem}; moved it to {aside} and trying the previous checkpoint")
        return None
    path = os.fspath(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise CheckpointError(f"resume_from_checkpoint={path!r}: no such checkpoint directory")
    verify_checkpoint(path)
    for line in set_newer_checkpoints_aside(output_dir, path):
        report(line)
    return path


def set_newer_checkpoints_aside(output_dir: str, path: str) -> list[str]:
    """Resuming ``output_dir``'s own ``checkpoint-N`` while later ones exist starts a new branch of the run: the
    later checkpoints belong to the one abandoned. Each is renamed ``checkpoint-M.superseded`` (kept, never
    resumed, never rotated away in place of the new branch's checkpoints); returns one line per rename.

    Without this, a kill early in the new branch would make ``--resume`` continue the abandoned branch's newest
    checkpoint, and ``save_total_limit`` would delete the new branch's checkpoints before the old ones.
    A ``checkpoint-M.superseded`` already there (from an earlier branch) is replaced.
    """
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    parent = os.path.dirname(os.path.abspath(path))
    if match is None or not os.path.isdir(output_dir) or not os.path.samefile(parent, output_dir):
        return []  # a checkpoint from elsewhere: this run's directory is not branched
    step = int(match.group(1))
    lines = []
    for newer in list_checkpoints(output_dir):
        newer_step = int(CHECKPOINT_PATTERN.match(os.path.basename(newer)).group(1))
        if newer_step <= step:
            continue
        aside = newer + SUPERSEDED_SUFFIX
        if os.path.exists(aside):
            _remove_tree(aside)
        os.replace(newer, aside)
        _fsync_path(output_dir)
        lines.append(f"resuming from checkpoint-{step}: moved the later {os.path.basename(newer)} of the run that "
                     f"continued from it to {os.path.basename(aside)} (rename it back to use it)")
    return lines


# ---------------------------------------------------------------------------------------------- loading
def load_trainer_state(path: str) -> dict[str, Any]:
    file = os.path.join(path, STATE_FILE)
    try:
        # The state holds numpy RNG tuples and python containers, not only tensors.
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:  # a damaged file fails in many ways (pickle, zip, EOF); say which file
        raise CheckpointError(f"could not read {file}: {type(error).__name__}: {str(error)[:200]}") from None


def load_adapter_weights(model, path: str) -> None:
    """Loads the checkpoint's LoRA weights into ``model`` in place (the engine's views stay valid)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = os.path.join(path, ADAPTER_WEIGHTS)
    try:
        state = load_file(file)
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"could not read {file}: {type(error).__name__}: {str(error)[:200]}") from None
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint {path} has adapter weights this model does not: {unexpected[:3]}")


# ---------------------------------------------------------------------------------------------- helpers
def _manifest(root: str, step: int) -> dict[str, Any]:
    files = {}
    for directory, _, names in os.walk(root):
        for name in sorted(names):
            file = os.path.join(directory, name)
            relative = os.path.relpath(file, root)
            if relative != MANIFEST_FILE:
                files[relative] = {"bytes": os.path.getsize(file), "sha256": _sha256(file)}
    return {"format": MANIFEST_FORMAT, "step": step, "files": files}


def _sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _write_json(file: str, value: Any) -> None:
    with open(file, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_tree(root: str) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_path(directory)


def _fsync_path(directory: str) -> None:
    # a rename is durable only once its directory is synced
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _is_disk_error(error: BaseException, output_dir: str) -> bool:
    """Whether a failed write is the disk's fault: an OSError, or a library's own error type for one (torch.save
    reports a full disk as e.g. RuntimeError("unexpected pos ..."), safetensors as "os error 28"), recognised
    by its text or by the device being (nearly) full."""
    if isinstance(error, OSError):
        return True
    if any(marker in str(error) for marker in ("No space left", "os error 28", "write failed", "Disk quota")):
        return True
    try:
        return shutil.disk_usage(output_dir).free < _NEARLY_FULL
    except OSError:
        return False


def _write_failure(output_dir: str, name: str, error: BaseException, disk_error: bool) -> str:
    if isinstance(error, OSError) and error.errno not in (errno.ENOSPC, errno.EDQUOT):
        reason = error.strerror or str(error)
    elif disk_error:
        reason = "no space left on the device"
    else:
        reason = f"{type(error).__name__}: {str(error)[:200]}"
    try:
        free = f"{shutil.disk_usage(output_dir).free / 2**20:,.1f} MiB free there now"
    except OSError:
        free = "free space unknown"
    intact = list_checkpoints(output_dir)
    if intact:
        needed = _checkpoint_bytes(intact[-1])
        size = f"; the last checkpoint took {needed / 2**20:,.1f} MiB" if needed else ""
        kept = (f"Intact: {', '.join(os.path.basename(p) for p in intact)} (resume continues from "
                f"{os.path.basename(intact[-1])}).")
    else:
        size, kept = "", "No earlier checkpoint exists."
    return (f"could not write {name} in {output_dir}: {reason} ({free}{size}). Nothing of this save was kept. "
            f"{kept}")


def _checkpoint_bytes(path: str) -> int:
    try:
        with open(os.path.join(path, MANIFEST_FILE), encoding="utf-8") as handle:
            return sum(entry["bytes"] for entry in json.load(handle)["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return 0
