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
``--list`` prints every setting with its default (and the example's value when an example is given).

Everything that can be checked before a model loads is: the settings, the output directory (one run per
directory; ``--resume`` needs a checkpoint), and where the model comes from (a missing local directory, or a
Hub model with no network, fails at once with the way out).
"""

from __future__ import annotations

import os
import sys


def _use_this_package() -> None:
    """Run from the folder that holds a clone named ``rlcore``, Python imports the clone's root (a folder with
    no ``__init__.py``) as an empty namespace package ``rlcore`` ahead of the installed one, and
    ``from rlcore import GRPOConfig`` then fails. This module was found all the same (through the install), so
    the real package is the one beside it: put that one in place."""
    package = sys.modules.get("rlcore")
    if package is None or getattr(package, "__file__", None) is not None:
        return
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("rlcore", os.path.join(here, "__init__.py"),
                                                  submodule_search_locations=[here])
    module = importlib.util.module_from_spec(spec)
    sys.modules["rlcore"] = module
    spec.loader.exec_module(module)


_use_this_package()

import argparse  # noqa: E402 - after the package fix above
import ast  # noqa: E402
import dataclasses  # noqa: E402
import difflib  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from rlcore.config import GRPOConfig, ModelConfig  # noqa: E402

DESCRIPTION = "Train what an example file declares (model, config, rewards, dataset) with GRPO / GSPO."
EPILOG = """\
examples:
  python -m rlcore.run examples/gsm8k_grpo.py --set model=tiny     the whole loop on a CPU, in seconds
  python -m rlcore.run examples/gsm8k_grpo.py --set model=/path/to/model-dir --set dataset=bundled
  python -m rlcore.run examples/gsm8k_grpo.py --resume             continue the run in output_dir
  python -m rlcore.run examples/gsm8k_grpo.py --list               every --set key, default and value

An example file defines model (a ModelConfig), config (a GRPOConfig), rewards (a list of reward functions)
and dataset(source=None), which returns the training rows; optionally eval_dataset(source=None) and tiny (a
dict of overrides applied with --set model=tiny). --set takes any GRPOConfig or ModelConfig field, plus model
(a Hub id, a local directory, or tiny) and dataset (passed to the example's dataset(), e.g. bundled or a
.jsonl path). Values are Python literals (0.1, True, [1, 2]) or plain strings.

One run per output_dir: a new run refuses a non-empty one (--resume continues it, --set
overwrite_output_dir=true starts over)."""


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


# ---------------------------------------------------------------------- --list
def field_comments(cls: type) -> dict[str, str]:
    """``field -> its trailing comment`` in the dataclass's source (the comment is the field's documentation)."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"^    (\w+): [^=]+=.*?  # (.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def settings_listing(example=None) -> str:
    """Every ``--set`` key with its default; with an example, also the example's value where it differs."""
    lines = ["settings for --set KEY=VALUE (default, then the example's value where it differs):", "",
             "  model                        a Hub id, a local model directory, or tiny (sets model_name_or_path)",
             "  dataset                      passed to the example's dataset(): e.g. bundled, hub, or a .jsonl path"]
    for cls, current in ((ModelConfig, getattr(example, "model", None)), (GRPOConfig, getattr(example, "config",
                                                                                               None))):
        lines += ["", f"{cls.__name__}:"]
        comments = field_comments(cls)
        defaults = cls()
        for item in dataclasses.fields(cls):
            if not item.init:
                continue
            default = getattr(defaults, item.name)
            text = f"  {item.name} = {default!r}"
            if current is not None and getattr(current, item.name) != default:
                text += f"  (example: {getattr(current, item.name)!r})"
            if item.name in comments:
                text = f"{text:<44} # {comments[item.name]}"
            lines.append(text)
    return "\n".join(lines)


# ---------------------------------------------------------------------- checks before loading anything heavy
def check_sources(model_config: ModelConfig, dataset_source: Any) -> None:
    """Fails at once, with the way out, where the model can not come: a missing local directory, a Hub model
    with the Hub unreachable, or an 8B-class download to a machine without a GPU. When the Hub is unreachable
    and the model does not need it, later Hub lookups (a dataset) are switched to offline so they fail fast."""
    from rlcore.model_source import ModelLoadError, hub_unreachable, model_source

    name = model_config.model_name_or_path
    try:
        source = model_source(name)
    except ModelLoadError:
        raise UsageError(f"--set model={name}: no such directory. Use --set model=/path/to/model-dir (a folder "
                         "with config.json, weights and tokenizer files), a Hub id, or --set model=tiny for the "
                         "tiny random test model") from None
    if source != "hub" and dataset_source not in (None, "hub"):
        return
    unreachable = hub_unreachable()
    if unreachable:
        # datasets / huggingface_hub read this when first imported: they then fail at once instead of retrying
        os.environ["HF_HUB_OFFLINE"] = "1"
        if source == "hub":
            raise UsageError(
                f"model {name!r} is not on this machine and the Hugging Face Hub is not reachable ({unreachable}). "
                "Without network: --set model=tiny --set dataset=bundled (the tiny random model on the bundled "
                "problems), or local copies: --set model=/path/to/model-dir --set dataset=path.jsonl")
        return
    if source == "hub" and model_config.engine == "auto":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                f"no CUDA GPU here, and model {name!r} would be downloaded to train on the CPU. On a laptop: "
                "--set model=tiny --set dataset=bundled (the whole loop with the tiny random model); to train "
                "this model on the CPU anyway: --set engine=hf")


def _launched_rank() -> tuple[int, int]:
    """(rank, number of processes) as torchrun set them; (0, 1) for a plain ``python`` run. Malformed values are
    reported by the trainer's own check, with the variable named."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _configure_logging() -> None:
    # rlcore's own logger only: configuring the root logger would print every library's messages twice
    # (once by the library's handler, once by ours)
    rank, world = _launched_rank()
    logger = logging.getLogger("rlcore")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[rlcore rank {rank}] %(message)s" if world > 1 else
                                               "[rlcore] %(message)s"))
        logger.addHandler(handler)
    # several processes: rank 0 tells the story, the others only warn (their info lines would repeat it)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcore.run", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("example", nargs="?", help="an example file, e.g. examples/gsm8k_grpo.py")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a GRPOConfig/ModelConfig field, model=..., or dataset=... (repeatable)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="resume from the newest checkpoint in output_dir, or from CHECKPOINT")
    parser.add_argument("--list", action="store_true",
                        help="print every setting --set accepts with its default (and the example's value)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    options = parser.parse_args(argv)
    if options.example is None and not options.list:
        parser.error("the example file is required (e.g. examples/gsm8k_grpo.py), or --list")
    _configure_logging()
    try:
        return _run(options)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    except Exception as error:
        from rlcore.checkpoint import CheckpointError
        from rlcore.dataset_rows import DatasetError
        from rlcore.distributed import RankFailedError
        from rlcore.model_source import ModelLoadError
        from rlcore.reporting import MetricsWriteError
        from rlcore.rewards import RewardError

        if isinstance(error, (UsageError, ModelLoadError, DatasetError, RewardError, CheckpointError,
                              MetricsWriteError, RankFailedError, ValueError)):
            rank, world = _launched_rank()
            print(f"error (rank {rank} of {world}): {error}" if world > 1 else f"error: {error}", file=sys.stderr)
            return 2
        raise


def _run(options) -> int:
    example = load_example(options.example) if options.example else None
    if options.list:
        print(settings_listing(example))
        return 0
    model_config, grpo_config, dataset_source = resolve(example, parse_overrides(options.overrides))
    from rlcore.output_dir import check_output_dir

    check_sources(model_config, dataset_source)
    check_output_dir(grpo_config.output_dir, options.resume, grpo_config.overwrite_output_dir)
    rows = call_dataset(example.dataset, dataset_source)
    eval_rows = call_dataset(example.eval_dataset, None) if hasattr(example, "eval_dataset") else None
    say = print if _launched_rank()[0] == 0 else _quiet  # several processes: rank 0 tells the story
    say("model:", json.dumps(model_config.to_dict(), sort_keys=True))
    say("config:", json.dumps(grpo_config.to_dict(), sort_keys=True))
    say(f"rewards: {', '.join(getattr(r, 'name', None) or getattr(r, '__name__', str(r)) for r in example.rewards)}")
    say(f"outputs: {os.path.abspath(grpo_config.output_dir)} (metrics.jsonl, training_curves.png, checkpoint-*/)")
    from rlcore.trainer import GRPOTrainer

    trainer = GRPOTrainer(model_config, reward_funcs=example.rewards, args=grpo_config, train_dataset=rows,
                          eval_dataset=eval_rows, show_progress=not options.no_progress)
    say(f"training {trainer.total_steps} steps on {len(trainer.train_rows)} prompts with engine "
        f"{trainer.engine.name}")
    started = time.perf_counter()
    try:
        summary = trainer.train(resume_from_checkpoint=options.resume)
    except BaseException as error:
        trainer.ranks.fail(error)  # several processes: the others stop at once instead of waiting for this one
        raise
    trainer.ranks.shutdown()  # several processes: leave the process group together
    final = summary["final_metrics"]
    ran = summary["steps_run"]
    where = (f" (steps {summary['first_step'] + 1}-{summary['steps']}, resumed from "
             f"{os.path.basename(summary['resumed_from'])})" if summary["resumed_from"] else "")
    say(f"\ndone: {ran} step{'s' if ran != 1 else ''}{where} in {time.perf_counter() - started:.1f} s")
    if final:
        say(f"  last step: reward {final.get('reward_mean', float('nan')):.4f} ± "
            f"{final.get('reward_std', float('nan')):.4f}, completion length "
            f"{final.get('completion_length_mean', float('nan')):.1f}, loss {final.get('loss', float('nan')):.4g}")
    say(f"  metrics:    {summary['metrics_file']}")
    say(f"  plot:       {summary['plot']}")
    if summary["checkpoint"]:
        say(f"  adapter:    {os.path.join(summary['checkpoint'][0], 'adapter')} (PEFT format)")
    return 0


def _quiet(*values: Any, **options: Any) -> None:
    pass


if __name__ == "__main__":
    sys.exit(main())
