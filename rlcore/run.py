"""``python -m rlcore.run EXAMPLE.py [--set key=value ...] [--resume [PATH]]``: train what an example file declares.

An example file is plain Python that defines:

* ``model``: a :class:`~rlcore.ModelConfig`
* ``config``: a :class:`~rlcore.GRPOConfig`
* ``rewards``: a list of RewardFunction instances or plain reward functions
* ``dataset(source=None)``: returns the training rows (a list of dicts with a ``prompt``, a datasets.Dataset,
  or a .jsonl path); ``source`` is what ``--set dataset=...`` says
* optionally ``eval_dataset(source=None)``, and ``tiny``: a dict of overrides applied with ``--set model=tiny``

``--set`` takes GRPOConfig and ModelConfig field names, plus ``model`` (a model id, a local directory, or
``tiny``) and ``dataset``. Values are Python literals (``0.1``, ``True``, ``[1, 2]``) or plain strings.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib.util
import inspect
import json
import logging
import os
import sys
import time
from typing import Any

from rlcore.config import GRPOConfig, ModelConfig


class UsageError(ValueError):
    """A command-line mistake; printed as one line, without a traceback."""


def parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = parse_value(value)
    return overrides


def load_example(path: str):
    if not os.path.isfile(path):
        raise UsageError(f"no such example file: {path}")
    spec = importlib.util.spec_from_file_location("rlcore_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    for name in ("model", "config", "rewards", "dataset"):
        if not hasattr(module, name):
            raise UsageError(f"{path} does not define {name!r} (an example defines model, config, rewards, dataset)")
    if not isinstance(module.model, ModelConfig):
        raise UsageError(f"{path}: 'model' must be a ModelConfig, got {type(module.model).__name__}")
    if not isinstance(module.config, GRPOConfig):
        raise UsageError(f"{path}: 'config' must be a GRPOConfig, got {type(module.config).__name__}")
    return module


def resolve(example, overrides: dict[str, Any]) -> tuple[ModelConfig, GRPOConfig, Any]:
    """Applies the example's ``tiny`` preset (when model=tiny) and then the explicit overrides."""
    overrides = dict(overrides)
    if overrides.get("model") == "tiny":
        overrides = {**getattr(example, "tiny", {}), **overrides}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig) if f.init}
    model_changes, grpo_changes = {}, {}
    dataset_source = overrides.pop("dataset", None)
    if "model" in overrides:
        model_changes["model_name_or_path"] = overrides.pop("model")
    for key, value in overrides.items():
        if key in model_fields:
            model_changes[key] = value
        elif key in grpo_fields:
            grpo_changes[key] = value
        else:
            close = difflib.get_close_matches(key, sorted(model_fields | grpo_fields | {"model", "dataset"}), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(f"--set {key}: unknown setting{hint}")
    model_config = example.model.replace(**model_changes)
    grpo_config = example.config.replace(**grpo_changes)
    return model_config, grpo_config, dataset_source


def call_dataset(function, source: Any):
    if not callable(function):
        return function if source is None else source
    takes_source = bool(inspect.signature(function).parameters)
    if source is not None and not takes_source:
        raise UsageError("this example's dataset() takes no source, so --set dataset=... can not be used")
    return function(source) if takes_source else function()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcore.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("example", help="an example file, e.g. examples/gsm8k_grpo.py")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a GRPOConfig/ModelConfig field, model=..., or dataset=... (repeatable)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="resume from the newest checkpoint in output_dir, or from CHECKPOINT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[rlcore] %(message)s")
    try:
        return _run(options)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    except Exception as error:
        from rlcore.data import DatasetError
        from rlcore.model import ModelLoadError
        from rlcore.rewards import RewardError

        if isinstance(error, (UsageError, ModelLoadError, DatasetError, RewardError, ValueError)):
            print(f"error: {error}", file=sys.stderr)
            return 2
        raise


def _run(options) -> int:
    example = load_example(options.example)
    model_config, grpo_config, dataset_source = resolve(example, parse_overrides(options.overrides))
    rows = call_dataset(example.dataset, dataset_source)
    eval_rows = call_dataset(example.eval_dataset, None) if hasattr(example, "eval_dataset") else None
    print("model:", json.dumps(model_config.to_dict(), sort_keys=True))
    print("config:", json.dumps(grpo_config.to_dict(), sort_keys=True))
    print(f"rewards: {', '.join(getattr(r, 'name', None) or getattr(r, '__name__', str(r)) for r in example.rewards)}")
    print(f"outputs: {os.path.abspath(grpo_config.output_dir)} (metrics.jsonl, training_curves.png, checkpoint-*/)")
    from rlcore.trainer import GRPOTrainer

    trainer = GRPOTrainer(model_config, reward_funcs=example.rewards, args=grpo_config, train_dataset=rows,
                          eval_dataset=eval_rows, show_progress=not options.no_progress)
    print(f"training {trainer.total_steps} steps on {len(trainer.train_rows)} prompts with engine "
          f"{trainer.engine.name}")
    started = time.perf_counter()
    summary = trainer.train(resume_from_checkpoint=options.resume)
    final = summary["final_metrics"]
    print(f"\ndone: {summary['steps']} steps in {time.perf_counter() - started:.1f} s")
    if final:
        print(f"  last step: reward {final.get('reward_mean', float('nan')):.4f} ± "
              f"{final.get('reward_std', float('nan')):.4f}, completion length "
              f"{final.get('completion_length_mean', float('nan')):.1f}, loss {final.get('loss', float('nan')):.4g}")
    print(f"  metrics:    {summary['metrics_file']}")
    print(f"  plot:       {summary['plot']}")
    if summary["checkpoint"]:
        print(f"  adapter:    {os.path.join(summary['checkpoint'][0], 'adapter')} (PEFT format)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
