"""2048 rules, determinism, and that a strategy can only choose moves: it cannot fake a win."""

from __future__ import annotations

import pytest

from rlcore.envs.game2048 import Board, GameBoard, execute_strategy, merge_left
from rlcore.envs.sandbox import SandboxLimits, create_locked_down_function

FAST = SandboxLimits(timeout=1.0, load_timeout=5.0, cpu_seconds=5)


@pytest.mark.parametrize("row, merged, points", [
    ([2, 2, 2, 2], [4, 4, 0, 0], 8),
    ([2, 2, 4, 0], [4, 4, 0, 0], 4),  # the new 4 does not merge again with the old 4
    ([4, 4, 8, 8], [8, 16, 0, 0], 24),
    ([0, 0, 0, 2], [2, 0, 0, 0], 0),
    ([2, 0, 2, 4], [4, 4, 0, 0], 4),
    ([2, 4, 2, 4], [2, 4, 2, 4], 0),
    ([8, 0, 8, 8], [16, 8, 0, 0], 16),
    ([0, 0, 0, 0], [0, 0, 0, 0], 0),
])
def test_merge_left(row, merged, points):
    assert merge_left(row) == (merged, points)


def test_moves_in_all_directions_and_score():
    rows = [[2, 2, 0, 0],
            [0, 0, 0, 0],
            [2, 0, 0, 0],
            [0, 0, 0, 4]]
    expected = {
        "A": [[4, 0, 0, 0], [0, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
        "D": [[0, 0, 0, 4], [0, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 4]],
        "W": [[4, 2, 0, 4], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        "S": [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [4, 2, 0, 4]],
    }
    for move, grid in expected.items():
        game = GameBoard.from_rows(rows, seed=0)
        assert game._moved(move)[0] == grid, move
        assert game.do_move(move.lower()) is True
        after = game.board()
        # exactly one tile spawned into a cell that was empty after the move
        diff = [(r, c) for r in range(4) for c in range(4) if after[r][c] != grid[r][c]]
        assert len(diff) == 1 and grid[diff[0][0]][diff[0][1]] == 0 and after[diff[0][0]][diff[0][1]] in (2, 4)
        assert game.score == 4 and game.moves == 1


def test_no_op_move_spawns_nothing_and_counts_as_a_move():
    game = GameBoard.from_rows([[2, 4], [0, 0]], seed=0)
    assert game.do_move("W") is False  # nothing can move up
    assert game.board() == [[2, 4], [0, 0]] and game.moves == 1 and game.score == 0
    with pytest.raises(ValueError, match="move must be one of W, A, S, D"):
        game.do_move("X")


def test_no_move_detection_and_failure():
    stuck = GameBoard.from_rows([[2, 4], [4, 2]])
    assert not stuck.can_move() and stuck.legal_moves() == [] and stuck.state() == "failed"
    mergeable = GameBoard.from_rows([[2, 2], [4, 8]])
    assert mergeable.can_move() and mergeable.legal_moves() == ["A", "D"] and mergeable.state() == "ongoing"
    vertical = GameBoard.from_rows([[2, 4], [2, 8]])
    assert vertical.legal_moves() == ["W", "S"]


def test_win_detection():
    game = GameBoard.from_rows([[32, 32], [0, 0]], target=64)
    assert game.state() == "ongoing"
    game.do_move("A")
    assert game.has_won() and game.state() == "success" and game.score == 64


def test_spawn_probability_of_fours():
    fours = total = 0
    for seed in range(2000):
        for row in GameBoard(size=4, seed=seed, probability_fours=0.25).board():
            for value in row:
                if value:
                    total += 1
                    fours += value == 4
    assert total == 4000  # two tiles at the start
    # 4000 draws at p=0.25: the standard deviation of the rate is ~0.007
    assert abs(fours / total - 0.25) < 0.03
    no_fours = GameBoard(size=4, seed=1, probability_fours=0.0)
    assert sorted(v for row in no_fours.board() for v in row if v) == [2, 2]


def test_determinism_with_seed():
    def play(seed):
        game = GameBoard(size=4, seed=seed)
        for move in "WASD" * 30:
            game.do_move(move)
        return game.board(), game.score

    assert play(7) == play(7)
    assert play(7) != play(8)


def test_board_is_a_copy_with_pretty():
    game = GameBoard.from_rows([[2, 0], [0, 1024]])
    board = game.board()
    assert isinstance(board, Board) and board == [[2, 0], [0, 1024]]
    board[0][0] = 2048
    assert game.board()[0][0] == 2 and not game.has_won()
    assert board.pretty() == "2048    .\n   . 1024"


def test_constructor_errors_name_the_field():
    with pytest.raises(ValueError, match="size"):
        GameBoard(size=1)
    with pytest.raises(ValueError, match="target"):
        GameBoard(target=100)
    with pytest.raises(ValueError, match="probability_fours"):
        GameBoard(probability_fours=1.5)
    with pytest.raises(ValueError, match="max_steps"):
        execute_strategy(lambda b: "W", GameBoard(seed=0), max_steps=0)


# ---------------------------------------------------------------------------------------------- execute_strategy

def test_plain_callable_strategies():
    cycle = iter("WASD" * 10_000)
    steps, state = execute_strategy(lambda board: next(cycle), GameBoard(size=3, seed=1, target=64))
    assert state in ("success", "failed") and steps > 10
    assert execute_strategy(lambda board: "Q", GameBoard(seed=0)) == (0, "invalid_move")
    assert execute_strategy(lambda board: 1 / 0, GameBoard(seed=0)) == (0, "error")
    # always "W": stuck on no-op moves until max_steps
    assert execute_strategy(lambda board: "W", GameBoard(seed=0), max_steps=50) == (50, "max_steps")


def test_sandboxed_strategy_is_deterministic_and_wins_small_games():
    code = ("def strategy(board):\n"
            "    n = len(board)\n"
            "    def free(move):\n"
            "        return sum(v == 0 for row in board for v in row)\n"
            "    order = ['A', 'S', 'D', 'W']\n"
            "    return order[sum(map(sum, board)) % 3]\n")
    results = []
    with create_locked_down_function(code, limits=FAST) as strategy:
        for _ in range(2):
            game = GameBoard(size=4, seed=3, target=128)
            results.append((execute_strategy(strategy, game, max_steps=2000), game.board(), game.score))
    assert results[0] == results[1]
    (steps, state), _, _ = results[0]
    # the budget is CPU time, not wall clock: a cheap strategy reaches the step limit however loaded the host
    assert state in ("success", "failed", "max_steps") and steps > 20


def test_time_limit_counts_cpu_time_not_wall_clock():
    import time

    def waits(board):  # 5 ms of wall clock per move, almost no CPU: a loaded host looks like this
        time.sleep(0.005)
        return "WASD"[sum(map(sum, board)) % 4]

    def spins(board):  # ~5 ms of CPU per move
        end = time.thread_time() + 0.005
        while time.thread_time() < end:
            pass
        return "WASD"[sum(map(sum, board)) % 4]

    # 40 moves take 0.2 s of wall clock, over the 0.05 s limit, yet the game is not cut short
    assert execute_strategy(waits, GameBoard(seed=0, target=2048), max_steps=40, time_limit=0.05) == (40, "max_steps")
    steps, state = execute_strategy(spins, GameBoard(seed=0, target=2048), max_steps=40, time_limit=0.05)
    assert state == "timeout" and 5 <= steps <= 12


def test_sandboxed_game_states():
    def run(code, **kwargs):
        with create_locked_down_function(code, limits=FAST) as strategy:
            return execute_strategy(strategy, GameBoard(seed=0), **kwargs)[1]

    assert run("def strategy(board):\n    return 'up'\n") == "invalid_move"
    assert run("def strategy(board):\n    return board[99]\n") == "error"
    assert run("import os\ndef strategy(board):\n    return 'W'\n") == "forbidden"
    assert run("def strategy(board):\n    while True:\n        pass\n", time_limit=0.5) == "timeout"
    assert run("def strategy(board):\n    return 'x' * 10**10\n") == "memory"
    slow = "def strategy(board):\n    s = 0\n    for i in range(30000):\n        s += i\n    return 'WASD'[s % 4]\n"
    assert run(slow, time_limit=0.3) == "timeout"


# Strategies that try to win without playing. Target 2048 cannot be reached legitimately in 20 moves.
CHEATS = [
    ("tamper with the board", "def strategy(board):\n    board[0][0] = 2048\n    return 'W'\n", True),
    ("return a verdict", "def strategy(board):\n    return 'success'\n", True),
    ("gc search", "import gc\ndef strategy(board):\n"
                  "    for o in gc.get_objects():\n        if type(o).__name__ == 'GameBoard':\n"
                  "            o._grid[0][0] = 2048\n    return 'W'\n", True),
    ("caller frames", "import sys\ndef strategy(board):\n"
                      "    f = sys._getframe(1)\n    f.f_locals['game']._grid[0][0] = 2048\n    return 'W'\n", True),
    ("globals", "def strategy(board):\n    globals()['game'] = None\n    return 'W'\n", True),
    # Static check off: the code reaches the worker's real gc and frames; the game is not there.
    ("gc search, unchecked",
     "def strategy(board):\n    gc = ().__class__.__base__.__subclasses__\n"
     "    for cls in gc():\n        if cls.__name__ == '_wrap_close':\n"
     "            b = cls.__init__.__globals__['__builtins__']\n"
     "    for o in b['__import__']('gc').get_objects():\n"
     "        if type(o).__name__ == 'GameBoard':\n            o._grid[0][0] = 2048\n"
     "    return 'W'\n", False),
    ("caller frames, unchecked",
     "def strategy(board):\n    g = (x for x in [1])\n    f = g.gi_frame\n"
     "    while f is not None:\n        if 'game' in f.f_locals:\n            f.f_locals['game']._grid[0][0] = 2048\n"
     "        f = f.f_back\n    board[0][0] = 2048\n    return 'W'\n", False),
]


@pytest.mark.parametrize("name, code, check", CHEATS, ids=[c[0] for c in CHEATS])
def test_strategies_cannot_fake_a_win(name, code, check):
    game = GameBoard(size=4, seed=5, target=2048)
    with create_locked_down_function(code, limits=FAST, check=check) as strategy:
        steps, state = execute_strategy(strategy, game, max_steps=20)
    assert state != "success" and not game.has_won() and game.max_tile() < 2048
    assert game.score < 2048
