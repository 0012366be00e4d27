"""The CPU-side pieces of benchmarks/precision.py: settings, the longest-length arithmetic, the table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "precision.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("precision_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_and_full_settings(bench):
    quick = bench.parse_args(["--quick", "--out-dir", "/tmp/x"])
    assert quick.dtype_list == ["bf16", "fp16", "float8"] and quick.vllm_mode == "graphs"
    assert quick.longest_tries == 0 and quick.phase_list == ["memory", "rollout", "train", "step", "longest"]
    assert bench.capture_sizes(quick) == [1, 8, 64, 128]
    full = bench.parse_args(["--dtypes", "float8", "--rollout-batches", "32,16", "--longest-tries", "2"])
    assert full.dtype_list == ["float8"] and full.vllm_mode == "compiled" and full.rollout_batch_list == [32, 16]
    assert full.longest_tries == 2 and full.max_model_len == 4096
    explicit = bench.parse_args(["--quick", "--vllm-mode", "eager", "--phases", "memory,train"])
    assert explicit.vllm_mode == "eager" and explicit.phase_list == ["memory", "train"]


@pytest.mark.parametrize("argv, message", [
    (["--dtypes", "bf16,int4"], "--dtypes"),
    (["--phases", "memory,warp"], "--phases"),
    (["--rollout-batches", "64,x"], "--rollout-batches"),
    (["--longest-probes", "4096"], "at least two"),
    (["--quick", "--rollout-len", "2000"], "--max-model-len"),
])
def test_bad_settings_name_the_option(bench, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_predict_longest_linear_and_quadratic(bench):
    gib = 2**30
    # 0.5 MiB per token plus 2 GiB: a 60 GiB budget (× 0.97) holds (58.2 − 2) GiB / 0.5 MiB tokens
    linear = [(length, 2 * gib + length * 2**19) for length in (4096, 16384, 32768)]
    assert bench.predict_longest(linear, 60 * gib) == int((0.97 * 60 * gib - 2 * gib) / 2**19)
    # a [L × L] fp32 tensor somewhere: the quadratic through the probes is solved instead
    quadratic = [(length, gib + length * 2**18 + 4 * length * length) for length in (4096, 16384, 32768)]
    predicted = bench.predict_longest(quadratic, 60 * gib)
    assert abs((gib + predicted * 2**18 + 4 * predicted**2) - 0.97 * 60 * gib) < 2**20
    assert bench.predict_longest(linear[:1], 60 * gib) is None
    assert bench.predict_longest([(1024, 5.0), (2048, 5.0)], 60 * gib) is None


def test_next_try_brackets_the_prediction(bench):
    fits_below = 101_000
    tried: dict[int, bool] = {}
    while (length := bench.next_try(tried, 100_000)) is not None:
        assert length % 1024 == 0 and length not in tried
        tried[length] = length <= fits_below
        assert len(tried) < 10
    fitting = max(k for k, ok in tried.items() if ok)
    assert fitting <= fits_below < min(k for k, ok in tried.items() if not ok)
    assert min(k for k, ok in tried.items() if not ok) - fitting <= 4096


def _result(dtype, vllm_gib, tok_s, longest):
    return {"dtype": dtype, "memory": {"vllm_weight_bytes": vllm_gib * 2**30, "shared_fraction": "291/291",
                                       "allocated_by_sharing": 1024},
            "rollout": {"256": {"engine_tok_s": tok_s, "raw_tok_s": tok_s / 0.99, "engine_over_raw": 0.99}},
            "train": {"tok_s": 10_000.0}, "longest": longest}


def test_table_has_ratios_against_bf16(bench, tmp_path):
    results = {"bf16": _result("bf16", 14.96, 14_000.0, {"predicted": 200_000, "checks": {}}),
               "float8": _result("float8", 8.46, 15_000.0, {"predicted": 210_000,
                                                             "checks": {"203776": True, "207872": False}})}
    table = bench.format_table(results)
    lines = table.splitlines()
    assert lines[0] == "| quantity | bf16 | float8 | float8 / bf16 |"
    row = next(line for line in lines if line.startswith("| weights held by vLLM"))
    assert row.startswith("| weights held by vLLM (GiB) | 14.96 | 8.46 |")
    assert row.endswith(f"| {8.46 / 14.96:.2f}× |")
    assert next(line for line in lines if line.startswith("| rollout tok/s, 256 seqs (VLLMEngine)")).endswith(
        f"| {15_000 / 14_000:.2f}× |")
    assert "| 291/291 | 291/291 | – |" in table
    longest = next(line for line in lines if line.startswith("| longest completion"))
    assert "| 200,000 | 203,776 |" in longest
    how = next(line for line in lines if line.startswith("|   (how)"))
    assert "est." in how and "measured" in how
    for dtype, result in results.items():
        (tmp_path / f"precision_{dtype}.json").write_text(json.dumps(result))
    assert bench.load_results(str(tmp_path)).keys() == {"bf16", "float8"}
    proc = subprocess.run([sys.executable, SCRIPT, "--table-only", "--out-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == table
