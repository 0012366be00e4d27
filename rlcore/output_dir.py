"""One run per ``output_dir``: a new run starts in an empty one, a resumed run continues its own checkpoints.

A new run in a directory that already holds files would mix two runs (metrics of one, checkpoints of the
other, and ``--resume`` picking the stale one), so it is refused unless ``overwrite_output_dir`` asks for the
previous run's files to be removed first. Resuming with no checkpoint to resume from is an error, as in TRL.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

logger = logging.getLogger("rlcore")

# What a run writes into output_dir: checkpoints (and what an interrupted save or a damaged checkpoint leaves),
# metrics.jsonl, the plot, TensorBoard events.
RUN_FILES = ("metrics.jsonl", "training_curves.png", "tensorboard")
RUN_PATTERN = re.compile(r"^\.?checkpoint-\d+(\.[a-z]+)*$")


class OutputDirError(ValueError):
    """``output_dir`` holds another run, or nothing to resume from; the message says what to do."""


def is_run_file(name: str) -> bool:
    """Whether ``name`` (an entry of output_dir) is something a run writes."""
    return name in RUN_FILES or RUN_PATTERN.match(name) is not None


def check_output_dir(output_dir: str, resume_from_checkpoint: bool | str | None = None,
                     overwrite_output_dir: bool = False) -> None:
    """Raises :class:`OutputDirError` when starting this run in ``output_dir`` would mix runs or find nothing
    to resume. Reads directory listings only (cheap: call it before loading a model); changes nothing."""
    from rlcore import checkpoint as checkpoints

    if resume_from_checkpoint:
        if resume_from_checkpoint is True:
            if not checkpoints.list_checkpoints(output_dir):
                raise OutputDirError(
                    f"resume: {os.path.abspath(output_dir)} holds no checkpoint to resume from; start a new run "
                    "without --resume (trainer.train() without resume_from_checkpoint), or point --resume at a "
                    "checkpoint-N directory")
            return
        path = os.fspath(resume_from_checkpoint)
        if not os.path.isfile(os.path.join(path, checkpoints.STATE_FILE)):
            reason = "no such directory" if not os.path.isdir(path) else f"no {checkpoints.STATE_FILE} in it"
            raise OutputDirError(f"resume: {path!r} is not a checkpoint ({reason}); expected a checkpoint-N "
                                 f"directory written by rlcore, e.g. {os.path.join(output_dir, 'checkpoint-10')}")
        return
    if overwrite_output_dir or not os.path.isdir(output_dir):
        return
    entries = sorted(os.listdir(output_dir))
    if entries:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise OutputDirError(
            f"output_dir {os.path.abspath(output_dir)} is not empty ({shown}): a new run there would mix with "
            "what is in it. Continue that run with --resume (train(resume_from_checkpoint=True)), start over "
            "with --set overwrite_output_dir=true (removes the previous run's checkpoints, metrics and plot), "
            "or choose another output_dir")


def prepare_output_dir(output_dir: str, resume_from_checkpoint: bool | str | None = None,
                       overwrite_output_dir: bool = False) -> str | None:
    """Checks as :func:`check_output_dir`, then returns the verified checkpoint to resume from (None: a new
    run). For a new run with ``overwrite_output_dir`` the previous run's files are removed first; other files
    are left where they are."""
    from rlcore import checkpoint as checkpoints

    check_output_dir(output_dir, resume_from_checkpoint, overwrite_output_dir)
    if resume_from_checkpoint:
        path = checkpoints.resolve_resume_path(output_dir, resume_from_checkpoint)
        if path is None:  # every checkpoint was damaged (each one was reported and moved aside)
            raise OutputDirError(f"resume: no intact checkpoint left in {os.path.abspath(output_dir)}; start a "
                                 "new run without --resume")
        return path
    if overwrite_output_dir and os.path.isdir(output_dir):
        removed = [name for name in sorted(os.listdir(output_dir)) if is_run_file(name)]
        for name in removed:
            path = os.path.join(output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        if removed:
            logger.info("overwrite_output_dir: removed the previous run from %s (%s)", output_dir, ", ".join(removed))
    return None
