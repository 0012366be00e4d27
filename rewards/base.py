"""The reward API: subclass :class:`RewardFunction`, or pass a plain TRL-style function.

A reward scores every completion of a batch::

    class ContainsAnswer(RewardFunction):
        name = "contains_answer"
        weight = 1.0

        def __call__(self, prompts, completions, answer, **columns):
            return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]

``prompts`` and ``completions`` have one entry per completion (each prompt is repeated
``num_generations`` times); ``columns`` are the dataset's other fields, repeated the same way.
Completions are strings, or lists of chat messages when the dataset is conversational.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Callable, Sequence
from types import EllipsisType
from typing import Any


class RewardError(RuntimeError):
    """A reward function failed on a batch; the message names the reward and the sample."""


class RewardTimeoutError(RewardError):
    """A reward did not return within its ``timeout``."""


DEFAULT_TIMEOUT = 300.0


class RewardFunction:
    """Base class for rewards.

    ``__call__`` returns one value per completion: a number, or None where the reward does not apply to that
    completion (TRL's convention: it is left out of the weighted sum; a completion to which no reward applies
    gets advantage 0).

    Attributes:
        name: shown in logs and metrics; defaults to the class name in snake_case.
        weight: multiplies this reward in the weighted sum (GRPOConfig.reward_weights overrides it).
        penalty: when None (default) a failure stops training with a :class:`RewardError` naming the reward
            and the sample; when a finite number, it replaces what failed and the failure is counted in the
            metrics: the sample whose value is not a finite number, or the whole batch when the call raised
            or returned the wrong number of values.
        timeout: seconds the call on one batch may take (default 300) before :class:`RewardTimeoutError`
            stops training, whatever ``penalty`` says. The call runs in a helper thread so that it can be
            abandoned; a thread cannot be killed, so a hung one keeps running in the background (as a daemon
            thread, it does not keep the process alive). ``None``: no limit, and the call runs in the calling
            thread (for rewards that must run in the main thread, e.g. ones using signals).
        required_columns: dataset columns this reward reads, with their type; the trainer checks every
            row once, before training, and names the first bad row.
    """

    name: str | None = None
    weight: float = 1.0
    penalty: float | None = None
    timeout: float | None = DEFAULT_TIMEOUT
    required_columns: dict[str, type | tuple[type, ...]] = {}

    def __init__(self, *, name: str | None = None, weight: float | None = None, penalty: float | None = None,
                 timeout: float | None | EllipsisType = ...) -> None:
        if name is not None:
            self.name = name
        if weight is not None:
            self.weight = weight
        if penalty is not None:
            self.penalty = penalty
        if timeout is not ...:
            self.timeout = timeout
        if self.name is None:
            self.name = _snake_case(type(self).__name__)
        check_reward_settings(self)

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(prompts, completions, **columns)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight})"


class FunctionReward(RewardFunction):
    """Wraps a plain function with TRL's signature ``f(prompts, completions, **kwargs) -> list[float]``."""

    def __init__(self, function: Callable[..., Sequence[float | None]], *, name: str | None = None,
                 weight: float | None = None, penalty: float | None = None,
                 timeout: float | None | EllipsisType = ...) -> None:
        if not callable(function):
            raise TypeError(f"reward must be callable, got {type(function).__name__}")
        self.function = function
        super().__init__(name=name or getattr(function, "__name__", None) or type(function).__name__,
                         weight=weight, penalty=penalty, timeout=timeout)
        parameters = inspect.signature(function).parameters.values()
        # TRL functions declare **kwargs; ones that don't get only the columns they name.
        self._accepts_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        self._named = {p.name for p in inspect.signature(function).parameters.values()}

    def __call__(self, prompts, completions, **columns):
        if not self._accepts_all:
            columns = {k: v for k, v in columns.items() if k in self._named}
        return self.function(prompts=prompts, completions=completions, **columns)


def as_reward_function(reward: RewardFunction | Callable[..., Sequence[float]]) -> RewardFunction:
    """Returns ``reward`` itself if it is a RewardFunction, else wraps the plain function."""
    if isinstance(reward, RewardFunction):
        return reward
    if isinstance(reward, type) and issubclass(reward, RewardFunction):
        raise TypeError(f"pass an instance of {reward.__name__}, not the class (write {reward.__name__}())")
    return FunctionReward(reward)


def check_reward_settings(reward: RewardFunction) -> None:
    """Raises ValueError naming the reward unless name, weight, penalty and timeout are usable. Run at
    construction and again before scoring (attributes may be set on the class or after construction)."""
    label = f"reward {reward.name!r}" if isinstance(reward.name, str) else f"reward {type(reward).__name__}"
    if not isinstance(reward.name, str) or not reward.name:
        raise ValueError(f"{label}: name must be a non-empty string, got {reward.name!r}")
    if not _is_finite_number(reward.weight):
        raise ValueError(f"{label}: weight must be a finite number, got {reward.weight!r}")
    if reward.penalty is not None and not _is_finite_number(reward.penalty):
        raise ValueError(f"{label}: penalty must be a finite number or None, got {reward.penalty!r}")
    if reward.timeout is not None and not (_is_finite_number(reward.timeout) and reward.timeout > 0):
        raise ValueError(f"{label}: timeout must be a positive number of seconds or None, got {reward.timeout!r}")


def _is_finite_number(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def completion_text(completion: Any) -> str:
    """The text of a completion: the string itself, or the assistant content of a chat message list (several
    assistant messages are joined by newlines; without any, all messages are)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"]
        return "\n".join(_content_text(m.get("content")) for m in (assistant or messages))
    raise TypeError(f"a completion must be a str or a list of chat messages, got {type(completion).__name__}")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal-style parts: [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)
