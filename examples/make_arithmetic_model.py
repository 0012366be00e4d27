"""Builds the arithmetic model that examples/arithmetic_grpo.py trains: tokenizer, Llama-3 model, fine-tuning.

    python examples/make_arithmetic_model.py --out outputs/arithmetic-model                 # ~100M, GPU
    python examples/make_arithmetic_model.py --preset tiny --out outputs/arithmetic-tiny    # ~0.7M, CPU

Writes a Hugging Face model directory (bf16 safetensors, tokenizer with the Llama-3 chat template,
generation_config.json) that transformers and vLLM load, and ``arithmetic_build.json`` in it with the settings,
the fine-tuning summary and held-out accuracy (greedy, and sampled at temperature 1 with pass@8).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from rlcore.arithmetic import SMALL_BUILD, TINY_BUILD, build_arithmetic_model, read_build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the model directory to write (must not exist yet)")
    parser.add_argument("--preset", choices=("small", "tiny"), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the preset's)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="wall-clock budget of the fine-tuning; fewer steps run when the planned ones do not fit")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    options = parser.parse_args(argv)
    if os.path.exists(options.out) and os.listdir(options.out):
        parser.error(f"--out {options.out}: exists and is not empty; pick a new directory")
    settings = SMALL_BUILD if options.preset == "small" else TINY_BUILD
    sft = dataclasses.replace(settings.sft, **({"steps": options.steps} if options.steps else {}),
                              max_seconds=options.max_seconds)
    settings = dataclasses.replace(settings, seed=options.seed, sft=sft)
    started = time.perf_counter()

    def stamp(text: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {text}", flush=True)

    path = build_arithmetic_model(options.out, settings, device=options.device, log=stamp)
    report = read_build_report(path)
    shown = {k: report.get(k) for k in ("parameters", "heldout_greedy_accuracy", "heldout_sampled",
                                        "build_seconds")}
    shown["sft_steps"] = report["sft"]["steps"]
    stamp(f"wrote {path}\n{json.dumps(shown, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
