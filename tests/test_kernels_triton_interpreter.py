"""Runs tests/test_kernels_triton.py in a child interpreter with ``TRITON_INTERPRET=1`` on machines without CUDA.

The variable must be set before triton is first imported, and other test modules import it (through
transformers/peft) first, hence the fresh process.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA tests/test_kernels_triton.py runs the kernels itself")
def test_triton_kernels_in_interpreter():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.path.join(root, "tests", "test_kernels_triton.py")
    env = dict(os.environ, RLCORE_TRITON_CHILD="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target],
                          cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
