"""benchmarks/kernel_ops.py --smoke runs on CPU and prints a row per op for ours and torch, with numerics."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernel_ops.py")
OPS = ("rmsnorm", "rope", "swiglu", "logprobs", "logprobs+grpo")


def _load():
    spec = importlib.util.spec_from_file_location("kernel_ops_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _table_rows(out: str) -> dict[tuple[str, str], list[str]]:
    """(op, impl) -> the final table's columns for that row."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op ") and "fwd+bwd ms" in line)
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith(" "):  # blank, or a group's "(scale)" line
            continue
        if line.startswith("notes:") or line.startswith("wrote "):
            break
        cols = line.split()
        rows[(cols[0], cols[2])] = cols
    return rows


def _check(out: str) -> None:
    rows = _table_rows(out)
    for op in OPS:
        for impl in ("ours", "torch"):
            cols = rows.get((op, impl))
            assert cols is not None, f"no {op}/{impl} row in:\n{out}"
            assert "skipped" not in cols and "Error" not in " ".join(cols), cols
            # numerics columns: ours agrees with the torch reference (fp32 smoke)
            dout, dgrad = float(cols[-4]), float(cols[-3])
            assert dout < 1e-4 and dgrad < 1e-4, cols
    assert ("swiglu", "liger") in rows, out  # printed, as a timing or as "skipped: <why>"


def test_kernel_ops_smoke(capsys, tmp_path, monkeypatch):
    # in this process triton may have been imported in compile mode: use the kernels' PyTorch fallbacks on CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bench = _load()
    path = tmp_path / "ops.json"
    assert bench.main(["--smoke", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    _check(out)
    assert path.exists()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_kernel_ops_smoke_triton_interpreter():
    """Our Triton kernels (not their PyTorch fallbacks) through the benchmark, in Triton's interpreter: the
    variable must be set before triton is imported, hence a fresh process (see test_kernels_benchmark.py)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--ops", "rmsnorm,rope,swiglu,logprobs"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Triton interpreter" in proc.stdout, proc.stdout
    _check(proc.stdout)
