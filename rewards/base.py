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
import re
from collections.abc import Callable, Sequence
from typing import Any


class RewardError(RuntimeError):
    """A reward function failed on a batch; the message names the reward and the sample."""


class RewardFunction:
    """Base class for rewards.

    Attributes:
        name: shown in logs and metrics; defaults to the class name in snake_case.
        weight: multiplies this reward in the weighted sum (GRPOConfig.reward_weights overrides it).
        penalty: when None (default) a failing sample raises :class:`RewardError`; when a number,
            the failing sample gets this value instead and the failure is counted in the metrics.
        required_columns: dataset columns this reward reads, with their type; the trainer checks every
            row once, before training, and names the first bad row.
    """

    name: str | None = None
    weight: float = 1.0
    penalty: float | None = None
    required_columns: dict[str, type | tuple[type, ...]] = {}

    def __init__(self, *, name: str | None = None, weight: float | None = None,
                 penalty: float | None = None) -> None:
        if name is not None:
            self.name = name
        if weight is not None:
            self.weight = weight
        if penalty is not None:
            self.penalty = penalty
        if self.name is None:
            self.name = _snake_case(type(self).__name__)
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(f"reward {self.name!r}: weight must be a finite number, got {self.weight!r}")

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(prompts, completions, **columns)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight})"


class FunctionReward(RewardFunction):
    """Wraps a plain function with TRL's signature ``f(prompts, completions, **kwargs) -> list[float]``."""

    def __init__(self, function: Callable[..., Sequence[float | None]], *, name: str | None = None,
                 weight: float | None = None, penalty: float | None = None) -> None:
        if not callable(function):
            raise TypeError(f"reward must be callable, got {type(function).__name__}")
        self.function = function
        super().__init__(name=name or getattr(function, "__name__", "reward"), weight=weight, penalty=penalty)
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
