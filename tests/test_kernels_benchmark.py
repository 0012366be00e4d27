"""benchmarks/train_step.py --smoke runs end to end on CPU and prints its table."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_smoke():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/train_step.py", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "method" in out and "x naive" in out
    for method in ("naive", "ours"):
        assert any(line.startswith(method) and "2x16" in line and "skipped" not in line
                   for line in out.splitlines()), out
    assert "log-prob head alone" in out
