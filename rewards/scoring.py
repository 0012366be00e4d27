"""Runs every reward on a batch of completions and checks what comes back.

A reward returns one value per completion, as a list, tuple or 1-D array (numpy, torch), in completion order:

* a real number: the score. It must be finite and within ±:data:`REWARD_LIMIT`, and so must the weighted sum
  of a completion's scores: larger values would overflow the float32 advantages;
* None: the reward does not apply to this completion (TRL's semantics). It is stored as NaN and left out of
  the weighted sum (``nansum``), of the group mean and std and of the reward's own mean. A completion to which
  no reward applies is unscorable: its reward is NaN and its advantage 0 (TRL 1.16 does the same, and warns).

Anything else is a failure of that reward: a :class:`RewardError` naming the reward and the sample, or, when
the reward has a ``penalty``, that value in place of what failed (counted in the metrics). A return value that
is not a sequence at all (e.g. a dict ``{index: value}``) is always an error. A reward that raises (SystemExit
included; KeyboardInterrupt passes through) is called again one completion at a time, so that the error can
name the first sample it fails on; the error shows the line of the reward's own code that raised.

Each call runs under the reward's ``timeout`` (see :class:`RewardFunction`) in a helper thread: threads need
no pickling of the reward or its inputs (a process would, and could not share a reward model on the GPU), at
the price that a hung call cannot be stopped, only abandoned.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import numbers
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import base
from .base import RewardError, RewardFunction, RewardTimeoutError, check_reward_settings

logger = logging.getLogger("rlcore")

# Half of float32's largest value: a completion's weighted reward must stay within ±REWARD_LIMIT so that
# rewards, and their differences from the group mean, are finite in float32.
REWARD_LIMIT = float(np.finfo(np.float32).max) / 2

_OWN_FILES = {__file__, base.__file__, threading.__file__}


@dataclass
class RewardScores:
    """Per-completion scores: ``values[i, j]`` is reward ``names[j]`` of completion ``i`` (NaN: not applicable)."""

    values: np.ndarray
    names: list[str]
    weights: np.ndarray
    failures: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def unscorable(self) -> np.ndarray:
        """Completions to which no reward applies (every value NaN)."""
        return np.isnan(self.values).all(axis=1) if self.values.shape[1] else np.ones(len(self.values), bool)

    def weighted_sum(self) -> np.ndarray:
        """r_i = Σ_j w_j · v_ij over the rewards that apply to completion i (NaN skipped, as TRL's ``nansum``);
        NaN for an unscorable completion, which the advantages then leave out of its group."""
        total = np.nansum(self.values * self.weights[None, :], axis=1)
        total[self.unscorable()] = np.nan
        return total

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """TRL's reward metrics, NaN-aware: ``reward_mean`` / ``reward_std`` of the weighted sum over scorable
        completions, ``rewards/<name>/mean`` / ``std`` over the completions the reward applies to (std is the
        unbiased one, NaN below 2 values), plus ``time_reward/<name>``, ``rewards/<name>/failures`` and
        ``rewards/unscorable`` (completions no reward applies to)."""
        total = self.weighted_sum()
        out = {f"{prefix}reward_mean": _nan_mean(total), f"{prefix}reward_std": _nan_std(total)}
        for j, name in enumerate(self.names):
            out[f"{prefix}rewards/{name}/mean"] = _nan_mean(self.values[:, j])
            out[f"{prefix}rewards/{name}/std"] = _nan_std(self.values[:, j])
            out[f"{prefix}time_reward/{name}"] = self.seconds.get(name, 0.0)
        for name, count in self.failures.items():
            out[f"{prefix}rewards/{name}/failures"] = count
        out[f"{prefix}rewards/unscorable"] = int(self.unscorable().sum())
        return out


def score_completions(
    rewards: list[RewardFunction],
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, list[Any]],
    weights: list[float] | None = None,
) -> RewardScores:
    """Scores ``completions`` with every reward; raises :class:`RewardError` naming the reward and sample.

    ``weights`` (GRPOConfig.reward_weights) overrides each reward's own ``weight`` when given.
    """
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions")
    for key, column in columns.items():
        if len(column) != n:
            raise ValueError(f"column {key!r} has {len(column)} values for {n} completions")
    if weights is not None and len(weights) != len(rewards):
        raise ValueError(f"reward_weights has {len(weights)} entries for {len(rewards)} reward functions")
    for reward in rewards:
        check_reward_settings(reward)
    weight_array = np.asarray(weights if weights is not None else [r.weight for r in rewards], dtype=np.float64)
    if not np.isfinite(weight_array).all():
        raise ValueError(f"reward weights must be finite, got {weight_array.tolist()}")
    batch = _Batch(prompts, completions, columns)
    values = np.zeros((n, len(rewards)), dtype=np.float64)
    failures: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for j, reward in enumerate(rewards):
        start = time.perf_counter()
        values[:, j] = _score_one(reward, batch, failures)
        seconds[reward.name] = time.perf_counter() - start
    scores = RewardScores(values, [r.name for r in rewards], weight_array, failures, seconds)
    _check_weighted_sum(scores, batch)
    unscorable = np.flatnonzero(scores.unscorable())
    if len(unscorable):
        logger.warning("no reward applies to %d of %d completions (all returned None), e.g. sample %d %s; they "
                       "get advantage 0", len(unscorable), n, unscorable[0], batch.describe(int(unscorable[0])))
    return scores


# ---------------------------------------------------------------------------------------------- one reward
class _Batch:
    def __init__(self, prompts: list[Any], completions: list[Any], columns: dict[str, list[Any]]) -> None:
        self.prompts, self.completions, self.columns = prompts, completions, columns

    def __len__(self) -> int:
        return len(self.completions)

    def sample(self, i: int) -> _Batch:
        return _Batch(self.prompts[i:i + 1], self.completions[i:i + 1],
                      {k: v[i:i + 1] for k, v in self.columns.items()})

    def describe(self, i: int) -> str:
        return f"(prompt {_snippet(self.prompts[i])}, completion {_snippet(self.completions[i])})"


def _score_one(reward: RewardFunction, batch: _Batch, failures: dict[str, int]) -> np.ndarray:
    n = len(batch)
    out, error = _call(reward, batch, reward.timeout)
    if error is not None:
        if reward.penalty is None:
            raise _raised_error(reward, batch, error) from error
        warnings.warn(f"reward {reward.name!r} raised {_error_text(error)}{_frames_text(error)}\n"
                      f"using penalty {reward.penalty} for the whole batch of {n}", stacklevel=3)
        failures[reward.name] = failures.get(reward.name, 0) + n
        return np.full(n, float(reward.penalty))
    out = _as_sequence(reward, out, n)
    if len(out) != n:
        if reward.penalty is None:
            raise RewardError(f"reward {reward.name!r} returned {len(out)} values for {n} completions "
                              "(one per completion, in order, None where it does not apply)")
        warnings.warn(f"reward {reward.name!r} returned {len(out)} values for {n} completions; using penalty "
                      f"{reward.penalty} for the whole batch", stacklevel=3)
        failures[reward.name] = failures.get(reward.name, 0) + n
        return np.full(n, float(reward.penalty))
    column = np.empty(n, dtype=np.float64)
    for i, value in enumerate(out):
        number, problem = _as_number(value)
        if problem is not None:
            if reward.penalty is None:
                raise RewardError(f"reward {reward.name!r} returned {_snippet(value)} for sample {i} "
                                  f"{batch.describe(i)}: {problem}")
            number = float(reward.penalty)
            failures[reward.name] = failures.get(reward.name, 0) + 1
        column[i] = number
    return column


def _as_sequence(reward: RewardFunction, out: Any, n: int) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return list(out)
    if getattr(out, "ndim", None) == 1 and hasattr(out, "tolist"):  # numpy array, torch tensor
        return out.tolist()
    hint = " (a dict is not accepted: return the values as a list in completion order)" \
        if isinstance(out, dict) else ""
    raise RewardError(f"reward {reward.name!r} returned {type(out).__name__} {_snippet(out)}; expected a list "
                      f"of {n} values, one per completion (a number, or None where it does not apply){hint}")


def _as_number(value: Any) -> tuple[float, str | None]:
    """(value as float, None) or (NaN, what is wrong with it). None → NaN: the reward does not apply."""
    if value is None:
        return math.nan, None
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-dim tensor / array
        value = value.item()
    if isinstance(value, (str, bytes)) or not isinstance(value, (numbers.Real, bool)):
        return math.nan, "expected a number, or None where the reward does not apply"
    try:
        number = float(value)
    except OverflowError:
        return math.nan, f"larger than ±{REWARD_LIMIT:.3g}, beyond what float32 advantages can hold"
    if not math.isfinite(number):
        return math.nan, "expected a finite number (return None where the reward does not apply)"
    if abs(number) > REWARD_LIMIT:
        return math.nan, f"larger than ±{REWARD_LIMIT:.3g}, beyond what float32 advantages can hold"
    return number, None


def _check_weighted_sum(scores: RewardScores, batch: _Batch) -> None:
    with np.errstate(over="ignore", invalid="ignore"):
        total = scores.weighted_sum()
    bad = np.flatnonzero(~scores.unscorable() & ~(np.abs(total) <= REWARD_LIMIT))
    if len(bad):
        i = int(bad[0])
        terms = " + ".join(f"{name} {v:.3g} × weight {w:g}" for name, v, w in
                           zip(scores.names, scores.values[i], scores.weights) if not math.isnan(v))
        raise RewardError(f"the weighted reward of sample {i} {batch.describe(i)} is {total[i]:.3g} ({terms}), "
                          f"beyond ±{REWARD_LIMIT:.3g} that float32 advantages can hold; scale the rewards or "
                          "their weights down")


# ---------------------------------------------------------------------------------------------- calling, errors
class _TimedOut(Exception):
    pass


def _call(reward: RewardFunction, batch: _Batch, timeout: float | None) -> tuple[Any, BaseException | None]:
    """(output, None), or (None, what the reward raised). KeyboardInterrupt propagates; a timeout raises
    RewardTimeoutError."""
    if timeout is None:
        try:
            return reward(batch.prompts, batch.completions, **batch.columns), None
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # SystemExit from a reward is that reward's failure, not a request to exit
            return None, error
    try:
        return _call_in_thread(reward, batch, timeout)
    except _TimedOut:
        n = len(batch)
        raise RewardTimeoutError(
            f"reward {reward.name!r} did not return within {timeout:g} s on a batch of {n} completion"
            f"{'s' if n != 1 else ''} (samples 0-{n - 1}; sample 0 {batch.describe(0)}). The call is left running "
            f"in a background thread. If the reward is just slow, raise its timeout (e.g. "
            f"{type(reward).__name__}.timeout = {timeout * 4:g}, or None for no limit)") from None


def _call_in_thread(reward: RewardFunction, batch: _Batch, timeout: float) -> tuple[Any, BaseException | None]:
    outcome: dict[str, Any] = {}
    done = threading.Event()
    # thread-local state the reward would have seen in the calling thread: context variables, torch's grad mode
    context = contextvars.copy_context()
    torch = sys.modules.get("torch")
    grad_mode = (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) if torch is not None else None

    def run() -> None:
        try:
            if grad_mode is not None:
                inference = torch.inference_mode() if grad_mode[1] else contextlib.nullcontext()
                with inference, torch.set_grad_enabled(grad_mode[0]):
                    outcome["value"] = reward(batch.prompts, batch.completions, **batch.columns)
            else:
                outcome["value"] = reward(batch.prompts, batch.completions, **batch.columns)
        except BaseException as error:  # handed to the calling thread
            outcome["error"] = error
        finally:
            done.set()

    thread = threading.Thread(target=context.run, args=(run,), name=f"rlcore-reward-{reward.name}", daemon=True)
    thread.start()
    if not done.wait(timeout):
        raise _TimedOut
    error = outcome.get("error")
    if isinstance(error, KeyboardInterrupt):
        raise error
    return outcome.get("value"), error


def _raised_error(reward: RewardFunction, batch: _Batch, error: BaseException) -> RewardError:
    """The error for a reward that raised on a batch, naming the first sample that fails on its own."""
    located = _first_failing_sample(reward, batch)
    if located is not None:
        i, sample_error = located
        return RewardError(f"reward {reward.name!r} raised {_error_text(sample_error)} on sample {i} "
                           f"{batch.describe(i)}{_frames_text(sample_error)}")
    return RewardError(f"reward {reward.name!r} raised {_error_text(error)} on a batch of {len(batch)} "
                       f"completions (no single completion reproduces it){_frames_text(error)}")


def _first_failing_sample(reward: RewardFunction, batch: _Batch) -> tuple[int, BaseException] | None:
    deadline = None if reward.timeout is None else time.monotonic() + reward.timeout
    for i in range(len(batch)):
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return None
        try:
            _, error = _call(reward, batch.sample(i), remaining)
        except RewardTimeoutError:
            return None
        if error is not None:
            return i, error
    return None


def _error_text(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _frames_text(error: BaseException) -> str:
    """The reward's own frames of a traceback: where the reward was entered and where it raised."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename not in _OWN_FILES]
    shown = frames if len(frames) <= 2 else [frames[0], frames[-1]]
    return "".join(f"\n  {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in shown)


def _snippet(value: Any) -> str:
    return repr(value)[:80]


def _nan_mean(x: np.ndarray) -> float:
    present = x[~np.isnan(x)]
    return float(present.mean()) if present.size else math.nan


def _nan_std(x: np.ndarray) -> float:
    present = x[~np.isnan(x)]
    return float(present.std(ddof=1)) if present.size > 1 else math.nan
