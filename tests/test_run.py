"""First contact with ``python -m rlcore.run``: help and settings listing, failing fast and clearly before any
model loads, one run per output directory, and running from the folder that holds the clone."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from rlcore.config import GRPOConfig, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "gsm8k_grpo.py")
# An endpoint that refuses at once: the Hub is "unreachable" whatever the machine's network.
NO_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""}


def run_cli(*args: str, cwd: str, env: dict[str, str] | None = None, timeout: int = 120):
    return subprocess.run([sys.executable, "-m", "rlcore.run", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def test_help_is_plain_text_and_list_shows_every_setting(tmp_path):
    shown = run_cli("--help", cwd=str(tmp_path))
    assert shown.returncode == 0 and "`" not in shown.stdout
    assert "--list" in shown.stdout and "overwrite_output_dir" in shown.stdout
    listed = run_cli(EXAMPLE, "--list", cwd=str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    for cls in (ModelConfig, GRPOConfig):
        defaults = cls()
        for item in dataclasses.fields(cls):
            if item.init:
                assert f"  {item.name} = {getattr(defaults, item.name)!r}" in listed.stdout, item.name
    # the example's own values are shown beside the defaults
    assert "learning_rate = 1e-06  (example: 5e-06)" in listed.stdout
    assert run_cli("--list", cwd=str(tmp_path)).returncode == 0
    missing = run_cli(cwd=str(tmp_path))
    assert missing.returncode == 2 and "the example file is required" in missing.stderr


def test_default_command_without_hub_fails_at_once_naming_both_ways_out(tmp_path):
    result = run_cli(EXAMPLE, "--set", f"output_dir={tmp_path / 'out'}", cwd=str(tmp_path), env=NO_HUB)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one message, printed once (no retries)
    assert "--set model=tiny" in lines[0] and "--set dataset=bundled" in lines[0]
    assert "not reachable" in lines[0] and "Retrying" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_missing_local_model_directory_says_so(tmp_path):
    result = run_cli(EXAMPLE, "--set", "model=/nonexistent/model-dir", "--set", f"output_dir={tmp_path}",
                     cwd=str(tmp_path), env=NO_HUB)
    assert result.returncode == 2 and "no such directory" in result.stderr and "Traceback" not in result.stderr
    assert "Hub" not in result.stderr.split("no such directory")[0]  # not reported as a bad Hub id


def test_pre_quantized_checkpoint_is_refused_naming_the_field(tmp_path):
    import json
    import shutil

    from rlcore.model_source import checkpoint_quantization
    from rlcore.tiny_model import build_tiny_model

    source = build_tiny_model()
    assert checkpoint_quantization(source) is None  # a 16-bit checkpoint passes
    model_dir = tmp_path / "fp8-model"
    shutil.copytree(source, model_dir)
    with open(model_dir / "config.json", encoding="utf-8") as handle:
        config = json.load(handle)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    with open(model_dir / "config.json", "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    result = run_cli(EXAMPLE, "--set", f"model={model_dir}", "--set", f"output_dir={tmp_path / 'out'}",
                     "--set", "dataset=bundled", cwd=str(tmp_path), env=NO_HUB)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "pre-quantized checkpoint" in result.stderr and "quant_method='fp8'" in result.stderr
    assert "dtype='float8'" in result.stderr  # says the way that works


@pytest.mark.parametrize("args, message", [
    (["--resume"], "holds no checkpoint to resume from"),
    (["--resume", "/nonexistent/checkpoint-3"], "is not a checkpoint (no such directory)"),
    ([], "is not empty (notes.txt)"),
])
def test_output_dir_problems_are_reported_before_the_model_loads(tmp_path, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's file")
    result = run_cli(EXAMPLE, "--set", "model=tiny", "--set", f"output_dir={out}", *args, cwd=str(tmp_path))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert "training" not in result.stdout and "policy:" not in result.stderr  # no model was loaded
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_runs_from_the_folder_that_holds_a_clone_named_rlcore(tmp_path):
    (tmp_path / "rlcore").symlink_to(ROOT, target_is_directory=True)
    result = run_cli("rlcore/examples/gsm8k_grpo.py", "--set", "model=/nonexistent/model-dir", cwd=str(tmp_path),
                     env=NO_HUB)
    # the example's "from rlcore import GRPOConfig" works: the error is about the model, not the import
    assert result.returncode == 2 and "no such directory" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_star_import_and_cheap_imports(tmp_path):
    code = ("import sys\n"
            "import rlcore.run\n"
            "assert 'torch' not in sys.modules, 'the CLI imports torch before it needs it'\n"
            "import rlcore.trainer\n"
            "heavy = [m for m in ('transformers', 'peft', 'torch._dynamo', 'vllm') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "from rlcore import *\n"
            "print(sorted(n for n in ('GRPOConfig', 'ModelConfig', 'RewardFunction', 'GRPOTrainer', 'load_policy')\n"
            "             if n in globals()))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['GRPOConfig', 'GRPOTrainer', 'ModelConfig', 'RewardFunction', 'load_policy']"
