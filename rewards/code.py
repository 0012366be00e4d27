"""Rewards for completions that write a Python function (the 2048 strategy task).

* :class:`FunctionWorks`: the completion has a ```python block whose code builds a function.
* :class:`NoCheating`: the code passes the static screen (allow-listed imports, no escape routes).
* :class:`StrategySucceeds`: the function, run in the sandbox, wins a game of 2048.

Code is only ever run in locked-down worker processes (:mod:`rlcore.envs.sandbox`); a batch is spread over
a :class:`~rlcore.envs.sandbox.WorkerPool` (``max_workers`` at a time). Nothing a completion does raises
out of these rewards: failures become scores.
"""

from __future__ import annotations

import random
import re
from typing import Any

from rlcore.envs.game2048 import (ERROR, FAILED, FORBIDDEN, INVALID_MOVE, MAX_STEPS, MEMORY, SUCCESS, TIMEOUT,
                                  GameBoard, execute_strategy)
from rlcore.envs.sandbox import SandboxLimits, WorkerPool, check_python_modules, default_pool

from .base import RewardFunction, completion_text

__all__ = ["FunctionWorks", "NoCheating", "StrategySucceeds", "completion_text", "extract_function"]

# Markdown fences open and close at the start of a line ("a ```python block" inside prose is not one).
_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)


def extract_function(text: str, name: str = "strategy") -> str | None:
    """The code of the first fenced block (```python, ```py or bare ```) that defines ``def name(``.

    The whole block is returned, imports and helpers included, so that the static screen sees them. An
    unclosed fence (a truncated completion) does not count. None when there is no such block.
    """
    if not isinstance(text, str):
        return None
    definition = re.compile(rf"^\s*def\s+{re.escape(name)}\s*\(", re.MULTILINE)
    for match in _FENCE.finditer(text):
        language, body = match.group(1).lower(), match.group(2)
        if language not in ("", "python", "py", "python3") or not definition.search(body):
            continue
        code = body.strip("\n")
        return code + "\n"
    return None


class _CodeReward(RewardFunction):
    """Shared plumbing: extract the function of every completion; run them on a worker pool."""

    def __init__(self, *, function_name: str, limits: SandboxLimits | None, max_workers: int | None,
                 name: str | None, weight: float | None, penalty: float | None) -> None:
        super().__init__(name=name, weight=weight, penalty=penalty)
        if not isinstance(function_name, str) or not function_name.isidentifier():
            raise ValueError(f"function_name must be a Python identifier, got {function_name!r}")
        self.function_name = function_name
        self.limits = limits
        self.max_workers = max_workers
        self._pool: WorkerPool | None = None
        self._owns_pool = False

    def pool(self) -> WorkerPool:
        # Made on first use, so that constructing a reward (e.g. in an example file) starts no process.
        if self._pool is None or self._pool._closed:
            self._owns_pool = self.max_workers is not None or self.limits is not None
            self._pool = (WorkerPool(max_workers=self.max_workers or 2, limits=self.limits) if self._owns_pool
                          else default_pool())
        return self._pool

    def close(self) -> None:
        """Stops this reward's own warm workers (the shared default pool is left alone)."""
        if self._pool is not None and self._owns_pool:
            self._pool.close()
        self._pool = None

    def codes(self, completions: list[Any]) -> list[str | None]:
        return [extract_function(completion_text(c), self.function_name) for c in completions]


class FunctionWorks(_CodeReward):
    """``works`` (+1) if the code runs its top level in the sandbox and defines the function,
    ``fails`` (-0.5) if it does not build (syntax error, rejected by the screen, an exception, a
    timeout), ``no_function`` (-2) if the completion has no fenced block defining it."""

    def __init__(self, *, works: float = 1.0, fails: float = -0.5, no_function: float = -2.0,
                 function_name: str = "strategy", limits: SandboxLimits | None = None,
                 max_workers: int | None = None, name: str | None = None, weight: float | None = None,
                 penalty: float | None = None) -> None:
        super().__init__(function_name=function_name, limits=limits, max_workers=max_workers, name=name,
                         weight=weight, penalty=penalty)
        self.works, self.fails, self.no_function = float(works), float(fails), float(no_function)

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        pool = self.pool()

        def score(code: str | None) -> float:
            if code is None:
                return self.no_function
            with pool.function(code, self.function_name) as function:
                return self.works if function.load().ok else self.fails

        return pool.map(score, self.codes(completions))


class NoCheating(_CodeReward):
    """``allowed`` (+1) if the code passes :func:`~rlcore.envs.sandbox.check_python_modules`,
    ``cheating`` (-20) if it imports a non-allow-listed module or reaches for an escape route,
    ``no_function`` (-1) if there is no function. Static only: runs nothing. A syntax error counts as
    ``no_function`` (there is no function to judge)."""

    def __init__(self, *, allowed: float = 1.0, cheating: float = -20.0, no_function: float = -1.0,
                 function_name: str = "strategy", name: str | None = None, weight: float | None = None,
                 penalty: float | None = None) -> None:
        super().__init__(function_name=function_name, limits=None, max_workers=None, name=name,
                         weight=weight, penalty=penalty)
        self.allowed, self.cheating, self.no_function = float(allowed), float(cheating), float(no_function)

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        scores = []
        for code in self.codes(completions):
            if code is None:
                scores.append(self.no_function)
                continue
            ok, info = check_python_modules(code)
            if ok:
                scores.append(self.allowed)
            elif info["error"]:
                scores.append(self.no_function)
            else:
                scores.append(self.cheating)
        return scores


class StrategySucceeds(_CodeReward):
    """Plays one game of 2048 with each completion's strategy, in the sandbox.

    ``success`` (+20) if a tile reaches ``target``; ``runs`` (+2) if the strategy plays until the board is
    stuck or ``max_steps`` without winning; ``timeout`` (-1) if the game runs out of ``time_limit``
    seconds; ``crash`` (-3) if the code is rejected, raises, crashes, exceeds memory or returns something
    other than W/A/S/D; ``no_function`` (-2) if there is no function.

    All completions of one call play the same game: ``seed`` fixes it for every call; ``seed=None`` draws
    a new one per call. ``size``/``target`` make small games (e.g. 3 and 64) for quick tests.
    ``last_states`` keeps the game outcome of each completion of the last call.
    """

    def __init__(self, *, success: float = 20.0, runs: float = 2.0, timeout: float = -1.0, crash: float = -3.0,
                 no_function: float = -2.0, size: int = 4, target: int = 2048, probability_fours: float = 0.1,
                 seed: int | None = None, max_steps: int = 10_000, time_limit: float = 5.0,
                 function_name: str = "strategy", limits: SandboxLimits | None = None,
                 max_workers: int | None = None, name: str | None = None, weight: float | None = None,
                 penalty: float | None = None) -> None:
        super().__init__(function_name=function_name, limits=limits, max_workers=max_workers, name=name,
                         weight=weight, penalty=penalty)
        GameBoard(size=size, seed=0, target=target, probability_fours=probability_fours)  # validates them
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise ValueError(f"StrategySucceeds max_steps must be an int >= 1, got {max_steps!r}")
        if not isinstance(time_limit, (int, float)) or isinstance(time_limit, bool) or time_limit <= 0:
            raise ValueError(f"StrategySucceeds time_limit must be a positive number, got {time_limit!r}")
        self.scores = {SUCCESS: float(success), FAILED: float(runs), MAX_STEPS: float(runs),
                       TIMEOUT: float(timeout), ERROR: float(crash), MEMORY: float(crash),
                       FORBIDDEN: float(crash), INVALID_MOVE: float(crash)}
        self.no_function = float(no_function)
        self.size, self.target, self.probability_fours = size, target, probability_fours
        self.seed, self.max_steps, self.time_limit = seed, max_steps, time_limit
        self.last_states: list[str] = []

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        pool = self.pool()
        seed = self.seed if self.seed is not None else random.randrange(2**31)

        def play(code: str | None) -> str:
            if code is None:
                return "no_function"
            game = GameBoard(size=self.size, seed=seed, target=self.target,
                             probability_fours=self.probability_fours)
            with pool.function(code, self.function_name) as function:
                _, state = execute_strategy(function, game, max_steps=self.max_steps, time_limit=self.time_limit)
            return state

        self.last_states = pool.map(play, self.codes(completions))
        return [self.no_function if state == "no_function" else self.scores.get(state, self.scores[ERROR])
                for state in self.last_states]
