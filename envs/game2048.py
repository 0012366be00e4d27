"""The 2048 game and a runner that plays it with a (possibly untrusted) strategy function.

Rules: moves are ``"W"`` (up), ``"A"`` (left), ``"S"`` (down), ``"D"`` (right). Tiles slide as far as they
go; two equal tiles that meet merge once per move (``[2, 2, 2, 2]`` moved left gives ``[4, 4, 0, 0]``) and
the merged value is added to the score. After a move that changed the board one new tile appears in a
random empty cell: a 4 with probability ``probability_fours``, else a 2. The game is won as soon as a tile
reaches ``target`` and lost when no move can change the board.

A move that does not change the board is a **no-op**: it is accepted and counted as a step, no tile
appears, and the game goes on (so a strategy stuck on such a move runs into ``max_steps`` or the time
limit instead of being stopped early).

The time limit counts the strategy's CPU time, not the wall clock: the same strategy on the same seed gets
the same outcome whether the host is idle or loaded (a wall-clock limit made it depend on host load).

The game lives in the trusted process. :func:`execute_strategy` hands the strategy a fresh copy of the
board as plain data on every move (through the sandbox worker's pipe when the strategy is a
:class:`~rlcore.envs.sandbox.LockedDownFunction`), so the strategy cannot reach or alter the game; it can
only choose moves.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from .sandbox import LockedDownFunction

logger = logging.getLogger("rlcore")

MOVES = ("W", "A", "S", "D")

# Outcomes of execute_strategy.
SUCCESS, FAILED, TIMEOUT, INVALID_MOVE, ERROR, MEMORY, FORBIDDEN, MAX_STEPS = (
    "success", "failed", "timeout", "invalid_move", "error", "memory", "forbidden", "max_steps")
GAME_STATES = (SUCCESS, FAILED, TIMEOUT, INVALID_MOVE, ERROR, MEMORY, FORBIDDEN, MAX_STEPS)


class Board(list):
    """A copy of the grid: a list of rows (lists of ints, 0 = empty) with :meth:`pretty`."""

    def pretty(self) -> str:
        width = max((len(str(v)) for row in self for v in row), default=1)
        return "\n".join(" ".join(str(v).rjust(width) if v else ".".rjust(width) for v in row) for row in self)


class GameBoard:
    """A 2048 game; deterministic given ``seed``.

    Args:
        size: the grid is ``size`` x ``size`` (>= 2).
        seed: seeds the tile spawns; None draws a random seed.
        target: the tile value that wins (a power of two >= 4).
        probability_fours: chance that a new tile is a 4 instead of a 2 (0..1).
    """

    def __init__(self, size: int = 4, seed: int | None = None, target: int = 2048,
                 probability_fours: float = 0.1) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 2:
            raise ValueError(f"GameBoard size must be an int >= 2, got {size!r}")
        if not isinstance(target, int) or isinstance(target, bool) or target < 4 or target & (target - 1):
            raise ValueError(f"GameBoard target must be a power of two >= 4, got {target!r}")
        if not isinstance(probability_fours, (int, float)) or not 0.0 <= probability_fours <= 1.0:
            raise ValueError(f"GameBoard probability_fours must be in [0, 1], got {probability_fours!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"GameBoard seed must be an int or None, got {seed!r}")
        self.size = size
        self.target = target
        self.probability_fours = float(probability_fours)
        self.seed = seed
        self.score = 0
        self.moves = 0  # accepted moves, no-ops included
        self._rng = random.Random(seed)
        self._grid = [[0] * size for _ in range(size)]
        self._spawn()
        self._spawn()

    @classmethod
    def from_rows(cls, rows: list[list[int]], *, seed: int | None = None, target: int = 2048,
                  probability_fours: float = 0.1) -> GameBoard:
        """A game starting from the given grid (no initial spawns); for tests and puzzles."""
        size = len(rows)
        if size < 2 or any(not isinstance(row, list) or len(row) != size for row in rows):
            raise ValueError(f"rows must be a square grid of at least 2x2, got {rows!r}")
        for row in rows:
            for value in row:
                if not isinstance(value, int) or value < 0 or (value and value & (value - 1)) or value == 1:
                    raise ValueError(f"rows: every cell must be 0 or a power of two >= 2, got {value!r}")
        game = cls(size=size, seed=seed, target=target, probability_fours=probability_fours)
        game._grid = [list(row) for row in rows]
        return game

    def board(self) -> Board:
        """A copy of the grid; changing it does not change the game."""
        return Board(list(row) for row in self._grid)

    def max_tile(self) -> int:
        return max(max(row) for row in self._grid)

    def has_won(self) -> bool:
        return self.max_tile() >= self.target

    def can_move(self) -> bool:
        """True when some move changes the board: an empty cell or two equal neighbours."""
        grid, n = self._grid, self.size
        for r in range(n):
            for c in range(n):
                value = grid[r][c]
                if not value or (c + 1 < n and grid[r][c + 1] == value) or (r + 1 < n and grid[r + 1][c] == value):
                    return True
        return False

    def legal_moves(self) -> list[str]:
        """The moves that change the board."""
        return [move for move in MOVES if self._moved(move)[0] != self._grid]

    def state(self) -> str:
        """"success" once a tile reaches the target, "failed" when no move is possible, else "ongoing"."""
        if self.has_won():
            return SUCCESS
        return "ongoing" if self.can_move() else FAILED

    def do_move(self, move: str) -> bool:
        """Plays ``move`` (W/A/S/D, case and surrounding spaces ignored); True if the board changed.

        A move that changes nothing is a no-op: no tile spawns. Raises ValueError for anything else.
        """
        key = normalize_move(move)
        if key is None:
            raise ValueError(f"move must be one of W, A, S, D, got {move!r}")
        grid, gained = self._moved(key)
        self.moves += 1
        if grid == self._grid:
            return False
        self._grid = grid
        self.score += gained
        self._spawn()
        return True

    def pretty(self) -> str:
        return self.board().pretty()

    def __repr__(self) -> str:
        return f"GameBoard(size={self.size}, target={self.target}, score={self.score}, state={self.state()!r})"

    def _spawn(self) -> None:
        empty = [(r, c) for r in range(self.size) for c in range(self.size) if not self._grid[r][c]]
        if not empty:
            return
        r, c = self._rng.choice(empty)
        self._grid[r][c] = 4 if self._rng.random() < self.probability_fours else 2

    def _moved(self, move: str) -> tuple[list[list[int]], int]:
        """The grid after ``move`` (without a spawn) and the points it scores."""
        grid = self._grid
        if move in ("W", "S"):
            grid = [list(column) for column in zip(*grid)]  # columns as rows: up = left
        if move in ("D", "S"):
            grid = [row[::-1] for row in grid]
        gained = 0
        merged_rows = []
        for row in grid:
            merged, points = merge_left(row)
            merged_rows.append(merged)
            gained += points
        if move in ("D", "S"):
            merged_rows = [row[::-1] for row in merged_rows]
        if move in ("W", "S"):
            merged_rows = [list(column) for column in zip(*merged_rows)]
        return merged_rows, gained


def merge_left(row: list[int]) -> tuple[list[int], int]:
    """Slides one row to the left, merging each pair of equal tiles once; returns (row, points)."""
    tiles = [value for value in row if value]
    out: list[int] = []
    points = 0
    i = 0
    while i < len(tiles):
        if i + 1 < len(tiles) and tiles[i] == tiles[i + 1]:
            out.append(tiles[i] * 2)
            points += tiles[i] * 2
            i += 2  # the merged tile cannot merge again this move
        else:
            out.append(tiles[i])
            i += 1
    return out + [0] * (len(row) - len(out)), points


def normalize_move(move: Any) -> str | None:
    """``"w"``, ``" W\\n"`` -> ``"W"``; None for anything that is not one of the four moves."""
    if not isinstance(move, str) or len(move) > 16:
        return None
    key = move.strip().upper()
    return key if key in MOVES else None


def execute_strategy(strategy: LockedDownFunction | Callable[[Board], str], game: GameBoard, *,
                     max_steps: int = 10_000, time_limit: float = 5.0) -> tuple[int, str]:
    """Plays ``game`` with ``strategy`` until it ends; returns ``(steps, state)``.

    ``strategy`` gets a copy of the board (a list of lists of ints) and returns a move. ``time_limit`` is the
    CPU time, in seconds, the strategy may use over the whole game, checked after every move: for a
    :class:`LockedDownFunction` its worker process's CPU time (read by this process from ``/proc``), for a plain
    callable (trusted code only: it runs in this process) this thread's CPU time. Host load therefore does
    not change the outcome. Each sandboxed call is also bounded by the sandbox's wall-clock
    ``limits.timeout``, which ends a strategy that blocks or spins in one call.

    ``state`` is "success" (a tile reached the target), "failed" (no move possible), "max_steps",
    "timeout" (``time_limit`` CPU seconds used up, or one call over ``limits.timeout``), "invalid_move" (the
    strategy returned something other than W/A/S/D), "error" (it raised or crashed), "memory" (it hit the
    memory limit) or "forbidden" (its code was rejected before running). ``steps`` counts the moves played.
    """
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if not isinstance(time_limit, (int, float)) or isinstance(time_limit, bool) or time_limit <= 0:
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    if not callable(strategy):
        raise TypeError(f"strategy must be callable, got {type(strategy).__name__}")
    sandboxed = isinstance(strategy, LockedDownFunction)
    steps = 0
    if sandboxed:
        # Starting the worker and running the code's top level is bounded by the sandbox's load_timeout.
        loaded = strategy.load()
        if not loaded.ok:
            return steps, loaded.status if loaded.status in GAME_STATES else ERROR
        clock = _WorkerCpuClock(strategy.pid)
    else:
        clock = _ThreadCpuClock()
    try:
        while True:
            state = game.state()
            if state != "ongoing":
                return steps, state
            if steps >= max_steps:
                return steps, MAX_STEPS
            if sandboxed:
                result = strategy(game.board())  # bounded by limits.timeout (wall clock) per call
                if not result.ok:
                    return steps, result.status if result.status in GAME_STATES else ERROR
                move = result.value
            else:
                try:
                    move = strategy(game.board())
                except Exception:  # noqa: BLE001 - a failing strategy ends its game, not the caller
                    return steps, ERROR
            if clock.seconds() > time_limit:
                return steps, TIMEOUT
            key = normalize_move(move)
            if key is None:
                return steps, INVALID_MOVE
            game.do_move(key)
            steps += 1
    finally:
        clock.close()


class _ThreadCpuClock:
    """CPU seconds this thread used since the clock was made (the strategy runs in it)."""

    def __init__(self) -> None:
        self.start = time.thread_time()

    def seconds(self) -> float:
        return time.thread_time() - self.start

    def close(self) -> None:
        pass


class _WorkerCpuClock:
    """CPU seconds (user + system) a worker process used since the clock was made, read from
    ``/proc/<pid>/stat`` by this process: the worker's own reports can not be trusted.

    Where ``/proc`` can not be read (not Linux) it falls back to the wall clock, with a warning: outcomes near
    the limit then depend on host load again.
    """

    _ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") and "SC_CLK_TCK" in os.sysconf_names else 100

    def __init__(self, pid: int | None) -> None:
        self._fd: int | None = None
        try:
            self._fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
            self.start = self._read()
        except (OSError, ValueError, IndexError):
            if self._fd is not None:
                os.close(self._fd)
            self._fd = None
            logger.warning("can not read the sandbox worker's CPU time from /proc; the 2048 time limit counts "
                           "wall-clock seconds instead")
            self.start = time.monotonic()

    def _read(self) -> float:
        data = os.pread(self._fd, 1024, 0)
        fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) ": state is field 3
        return (int(fields[11]) + int(fields[12])) / self._ticks  # utime, stime (fields 14, 15)

    def seconds(self) -> float:
        if self._fd is None:
            return time.monotonic() - self.start
        try:
            return self._read() - self.start
        except (OSError, ValueError, IndexError):
            return float("inf")  # the worker is gone: its next call fails anyway

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
