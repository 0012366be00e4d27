"""Atomic checkpoints: LoRA adapter (PEFT format), optimizer, scheduler, RNG states, step, config, rollout buffer.

A checkpoint is written to a temporary directory beside its final place and renamed into place, so a crash
mid-save leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"


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


def save_checkpoint(output_dir: str, step: int, model, tokenizer, trainer_state: dict[str, Any],
                    configs: dict[str, dict[str, Any]], save_total_limit: int | None = None) -> str:
    """Writes ``output_dir/checkpoint-{step}`` atomically and returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    temporary = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    if os.path.exists(temporary):
        shutil.rmtree(temporary)
    os.makedirs(temporary)
    model.save_pretrained(os.path.join(temporary, ADAPTER_DIR))
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(temporary, ADAPTER_DIR))
    torch.save(trainer_state, os.path.join(temporary, STATE_FILE))
    with open(os.path.join(temporary, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(configs, handle, indent=2, sort_keys=True)
    _fsync_tree(temporary)
    if os.path.exists(final):
        # Re-saving the same step (e.g. the final save after a periodic one): swap in the new one.
        stale = final + ".old"
        os.replace(final, stale)
        os.replace(temporary, final)
        shutil.rmtree(stale)
    else:
        os.replace(temporary, final)
    if save_total_limit:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old)
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume_path(output_dir: str, resume_from_checkpoint: bool | str | None) -> str | None:
    """``True`` → the newest checkpoint in output_dir (None if there is none); a path → that checkpoint."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint is True:
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = os.fspath(resume_from_checkpoint)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ValueError(f"resume_from_checkpoint={path!r} is not a checkpoint directory (no {STATE_FILE})")
    return path


def load_trainer_state(path: str) -> dict[str, Any]:
    # The state holds numpy RNG tuples and python containers, not only tensors.
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def load_adapter_weights(model, path: str) -> None:
    """Loads the checkpoint's LoRA weights into ``model`` in place (the engine's views stay valid)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = os.path.join(path, ADAPTER_DIR)
    file = os.path.join(adapter, "adapter_model.safetensors")
    state = load_file(file)
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint {path} has adapter weights this model does not: {unexpected[:3]}")


def _fsync_tree(root: str) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
