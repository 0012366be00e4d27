"""The whole trainer against faults and hostile input: a damaged checkpoint, a full disk, rewards that fail or
do not apply, text that cannot be encoded. Uses the tiny model (CPU)."""

from __future__ import annotations

import inspect
import logging
import os
import subprocess

import pytest

from rlcore.checkpoint import CheckpointError, list_checkpoints
from rlcore.config import ModelConfig
from rlcore.dataset_rows import DatasetError
from rlcore.reporting import read_metrics
from rlcore.rewards import RewardError, RewardFunction
from rlcore.trainer import GRPOTrainer
from test_trainer import ROWS, DigitShare, make_trainer, small_config


def test_damaged_newest_checkpoint_resume_falls_back_and_reproduces_the_run(tmp_path, caplog):
    config = small_config(tmp_path, max_steps=2, save_steps=1)
    make_trainer(config).train()
    expected = read_metrics(os.path.join(config.output_dir, "metrics.jsonl"))
    adapter = os.path.join(config.output_dir, "checkpoint-2", "adapter", "adapter_model.safetensors")
    data = bytearray(open(adapter, "rb").read())
    data[-3] ^= 0x10  # one flipped bit in a LoRA weight: loads fine, silently wrong without checksums
    open(adapter, "wb").write(bytes(data))

    with caplog.at_level(logging.WARNING, logger="rlcore"):
        summary = make_trainer(config).train(resume_from_checkpoint=True)
    assert (f"skipped {os.path.join(config.output_dir, 'checkpoint-2')}: adapter/adapter_model.safetensors does "
            "not match its checksum (corrupted)") in caplog.text
    assert "resumed from" in caplog.text or summary["steps"] == 2
    records = read_metrics(summary["metrics_file"])
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "grad_norm", "reward_mean"):
        assert [r[key] for r in records] == pytest.approx([r[key] for r in expected], abs=1e-6), key
    assert [os.path.basename(p) for p in list_checkpoints(config.output_dir)] == ["checkpoint-1", "checkpoint-2"]
    assert os.path.isdir(os.path.join(config.output_dir, "checkpoint-2.corrupt"))


class Picky(RewardFunction):
    """Does not apply to completions without a digit (all of a group may lack one); when ``fails`` is set, raises
    on completions whose length is a multiple of 3."""

    fails = False
    batch: list[str] = []

    def __call__(self, prompts, completions, **columns):
        if len(completions) > 1:
            self.batch = list(completions)
        out = []
        for completion in completions:
            if self.fails and len(completion) % 3 == 0:
                raise ValueError(f"cannot score {completion[:10]!r}")
            digits = sum(ch.isdigit() for ch in completion)
            out.append(digits / len(completion) if digits else None)
        return out


class NeverApplies(RewardFunction):
    name = "never"

    def __call__(self, prompts, completions, **columns):
        return [None] * len(completions)


def test_none_rewards_train_and_a_raising_reward_names_sample_and_line(tmp_path):
    picky, never = Picky(), NeverApplies()
    trainer = GRPOTrainer(ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32"),
                          reward_funcs=[picky, never], args=small_config(tmp_path, max_steps=2), train_dataset=ROWS,
                          show_progress=False)
    metrics = trainer.training_step(0)  # some or all completions unscorable: no error, finite loss
    assert metrics["rewards/unscorable"] >= 0 and metrics["loss"] == metrics["loss"]
    assert metrics["rewards/never/mean"] != metrics["rewards/never/mean"]  # NaN: never applied
    assert all(v == v for k, v in metrics.items() if k.startswith("advantage_"))

    picky.fails = True
    trainer.buffers.clear()  # the next step generates and scores again
    with pytest.raises(RewardError) as caught:
        trainer.training_step(1)
    message = str(caught.value)
    first = next(i for i, c in enumerate(picky.batch) if len(c) % 3 == 0)
    assert f"reward 'picky' raised ValueError: cannot score {picky.batch[first][:10]!r} on sample {first} " \
           "(prompt 'Write the number" in message
    source, start = inspect.getsourcelines(Picky.__call__)
    line = start + next(i for i, text in enumerate(source) if "raise ValueError" in text)
    assert f"{__file__}:{line} in __call__: raise ValueError(" in message


def test_unencodable_prompt_is_refused_before_training(tmp_path):
    rows = [dict(row) for row in ROWS]
    rows[7] = {"prompt": "Write the number \ud800 and more numbers:"}
    with pytest.raises(DatasetError, match="train_dataset row 7: field 'prompt' holds text that is not valid"):
        GRPOTrainer(ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32"),
                    reward_funcs=[DigitShare()], args=small_config(tmp_path), train_dataset=rows,
                    show_progress=False)


# ---------------------------------------------------------------------------------------------- a real full disk
@pytest.fixture
def tiny_disk(tmp_path):
    """A tmpfs of 900 KiB: metrics lines fit, one tiny-model checkpoint (~620 KB) fits, a second does not."""
    path = tmp_path / "disk"
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the fake-full-disk tests cover the logic)")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_at_checkpoint_save_one_error_then_resume(tiny_disk, tmp_path):
    config = small_config(tmp_path, output_dir=str(tiny_disk / "run"), max_steps=3, save_steps=1)
    trainer = make_trainer(config)
    with pytest.raises(CheckpointError) as caught:
        trainer.train()
    message = str(caught.value)
    assert message.startswith(f"could not write checkpoint-2 in {config.output_dir}: no space left on the device (")
    assert "Intact: checkpoint-1 (resume continues from checkpoint-1)" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # one error, no chained tracebacks
    names = sorted(os.listdir(config.output_dir))
    assert names in (["checkpoint-1", "metrics.jsonl"], ["checkpoint-1", "metrics.jsonl", "training_curves.png"])
    if "training_curves.png" in names:  # written only if it fitted, and then whole
        assert open(os.path.join(config.output_dir, "training_curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert [r["step"] for r in read_metrics(os.path.join(config.output_dir, "metrics.jsonl"))] == [1, 2]

    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_disk)], check=True)  # space freed
    summary = make_trainer(config).train(resume_from_checkpoint=True)
    assert [r["step"] for r in read_metrics(summary["metrics_file"])] == [1, 2, 3]
    assert [os.path.basename(p) for p in list_checkpoints(config.output_dir)] == ["checkpoint-1", "checkpoint-2",
                                                                                 "checkpoint-3"]


@pytest.mark.slow
def test_cli_full_disk_is_one_line_without_traceback(tiny_disk, tmp_path):
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tiny_disk / "gsm8k"
    result = subprocess.run(
        [sys.executable, "-m", "rlcore.run", os.path.join(root, "examples", "gsm8k_grpo.py"), "--set", "model=tiny",
         "--set", "dataset=bundled", "--set", f"output_dir={out}", "--set", "max_steps=2", "--set", "save_steps=1",
         "--no-progress"], capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"could not write checkpoint-2 in {out}: no space left on the device" in errors[0]
    assert not os.path.exists(out / "training_curves.png") or os.path.getsize(out / "training_curves.png") > 0
