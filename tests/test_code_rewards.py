"""The code rewards: extraction, the three tutorial rewards, and a training-like loop over hostile output."""

from __future__ import annotations

import gc
import threading
import time

import psutil
import pytest

from rlcore.envs.sandbox import SandboxLimits
from rlcore.rewards.code import FunctionWorks, NoCheating, StrategySucceeds, completion_text, extract_function
from rlcore.rewards.scoring import score_completions

FAST = SandboxLimits(timeout=0.5, load_timeout=1.5, cpu_seconds=5)
GAME = {"size": 3, "target": 32, "seed": 0, "time_limit": 1.0, "max_steps": 500}

GOOD = """Here is my strategy:
```python
import math

def strategy(board):
    def slide(row):
        tiles = [v for v in row if v]
        out, i = [], 0
        while i < len(tiles):
            if i + 1 < len(tiles) and tiles[i] == tiles[i + 1]:
                out.append(2 * tiles[i])
                i += 2
            else:
                out.append(tiles[i])
                i += 1
        return out + [0] * (len(row) - len(out))

    def move(b, m):
        if m in "WS":
            b = [list(c) for c in zip(*b)]
        if m in "DS":
            b = [r[::-1] for r in b]
        b = [slide(r) for r in b]
        if m in "DS":
            b = [r[::-1] for r in b]
        if m in "WS":
            b = [list(c) for c in zip(*b)]
        return b

    for m in "ASDW":  # keep big tiles in the bottom-left corner
        if move(board, m) != board:
            return m
    return "W" if math.isfinite(1.0) else "A"
```
It should work."""
STUCK = "```python\ndef strategy(board):\n    return 'W'\n```"
NO_FUNCTION = "I would move up a lot."
BROKEN = "```python\ndef strategy(board)\n    return 'W'\n```"
RAISES_AT_LOAD = "```python\nraise ValueError('nope')\ndef strategy(board):\n    return 'W'\n```"
CHEAT = "```python\nimport os\ndef strategy(board):\n    return 'W'\n```"
ESCAPE = "```python\ndef strategy(board):\n    return str(().__class__.__base__.__subclasses__())\n```"
LOOP = "```python\ndef strategy(board):\n    while True:\n        pass\n```"
CRASH = "```python\ndef strategy(board):\n    return board[100]\n```"


def test_extract_function():
    assert extract_function(GOOD).startswith("import math\n\ndef strategy(board):")
    assert extract_function(NO_FUNCTION) is None
    assert extract_function("```python\ndef other(board):\n    return 'W'\n```") is None
    assert extract_function("```python\ndef strategy(board):\n    return 'W'\n") is None  # truncated
    assert extract_function("```js\nfunction strategy(board) {}\n```") is None
    two = "```python\nx = 1\n```\nthen\n```py\ndef strategy(b):\n    return 'A'\n```"
    assert extract_function(two) == "def strategy(b):\n    return 'A'\n"
    assert extract_function("```\ndef solve(x):\n    return x\n```", name="solve") == "def solve(x):\n    return x\n"


def test_completion_text_accepts_strings_and_chat_messages():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "abc"}]) == "abc"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}]}]) == "a"
    with pytest.raises(TypeError, match="a completion must be a str"):
        completion_text(3)


def test_function_works():
    reward = FunctionWorks(limits=FAST, max_workers=2)
    try:
        completions = [GOOD, NO_FUNCTION, BROKEN, RAISES_AT_LOAD, CHEAT, [{"role": "assistant", "content": STUCK}]]
        assert reward([""] * 6, completions) == [1.0, -2.0, -0.5, -0.5, -0.5, 1.0]
        custom = FunctionWorks(works=3, fails=-1, no_function=-7, limits=FAST, max_workers=1)
        assert custom(["", ""], [GOOD, NO_FUNCTION]) == [3.0, -7.0]
        custom.close()
    finally:
        reward.close()


def test_no_cheating():
    reward = NoCheating()
    assert reward([""] * 5, [GOOD, CHEAT, ESCAPE, NO_FUNCTION, BROKEN]) == [1.0, -20.0, -20.0, -1.0, -1.0]
    assert NoCheating(cheating=-5)([""], [CHEAT]) == [-5.0]


def test_strategy_succeeds():
    reward = StrategySucceeds(limits=FAST, max_workers=2, **GAME)
    try:
        completions = [GOOD, STUCK, NO_FUNCTION, LOOP, CRASH, CHEAT,
                       [{"role": "assistant", "content": GOOD}]]
        scores = reward([""] * len(completions), completions)
        assert reward.last_states[1:] == ["max_steps", "no_function", "timeout", "error", "forbidden",
                                          reward.last_states[0]]
        assert reward.last_states[0] in ("success", "failed")
        assert scores[1:6] == [2.0, -2.0, -1.0, -3.0, -3.0]
        assert scores[0] == (20.0 if reward.last_states[0] == "success" else 2.0) == scores[6]
    finally:
        reward.close()


def test_strategy_succeeds_is_reproducible_with_a_seed_and_reaches_small_targets():
    reward = StrategySucceeds(limits=FAST, max_workers=1, size=3, target=16, seed=4, time_limit=2.0)
    try:
        first = reward(["", ""], [GOOD, GOOD])
        assert first == reward(["", ""], [GOOD, GOOD])
        assert first == [20.0, 20.0], reward.last_states
    finally:
        reward.close()


def test_constructor_errors_name_the_field():
    with pytest.raises(ValueError, match="target"):
        StrategySucceeds(target=100)
    with pytest.raises(ValueError, match="time_limit"):
        StrategySucceeds(time_limit=0)
    with pytest.raises(ValueError, match="function_name"):
        FunctionWorks(function_name="not an identifier")


HOSTILE_COMPLETIONS = [
    LOOP, CRASH, CHEAT, ESCAPE, BROKEN, NO_FUNCTION, RAISES_AT_LOAD,
    "```python\ndef strategy(board):\n    x = []\n    while True:\n        x.append(' ' * 10**7)\n```",
    "```python\nimport sys\ndef strategy(board):\n    sys.exit(0)\n```",
    "```python\ndef strategy(board):\n    raise SystemExit(1)\n```",
    "```python\ndef strategy(board):\n    print('x' * 10**6)\n    return 'Z'\n```",
    "```python\ndef strategy(board):\n    return 'x' * 10**7\n```",
    "```python\nwhile True:\n    pass\ndef strategy(board):\n    return 'W'\n```",
    "```python\ndef strategy(board):\n    return strategy(board)\n```",
    [{"role": "assistant", "content": "```python\ndef strategy(board):\n    return {'move': object}\n```"}],
]


def test_training_like_loop_survives_hostile_completions():
    limits = SandboxLimits(timeout=0.5, load_timeout=1.0, cpu_seconds=5, memory_bytes=256 * 1024 * 1024)
    rewards = [FunctionWorks(limits=limits, max_workers=2), NoCheating(),
               StrategySucceeds(limits=limits, max_workers=2, **GAME)]
    me = psutil.Process()
    peak = [0]
    stop = threading.Event()

    def watch():  # the pools must bound how many workers exist at once
        while not stop.is_set():
            peak[0] = max(peak[0], len(me.children(recursive=True)))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for step in range(2):
            batch = HOSTILE_COMPLETIONS + [GOOD]
            scores = score_completions(rewards, [""] * len(batch), batch, {})
            assert scores.values.shape == (len(batch), 3)
            assert scores.values[-1].tolist()[:2] == [1.0, 1.0]
            assert (scores.values[:-1, 2] <= 2.0).all()  # no hostile completion wins the game
    finally:
        stop.set()
        watcher.join()
        for reward in rewards:
            reward.close()
    # per pool: max_workers busy + max_workers warm spares; FunctionWorks and StrategySucceeds run one after
    # the other, so at most one pool is busy while the other only holds spares
    assert peak[0] <= 2 * 2 + 2, peak[0]
    gc.collect()
    deadline = time.monotonic() + 5
    while me.children(recursive=True) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert me.children(recursive=True) == []


def test_game2048_example_defines_what_the_runner_needs():
    import dataclasses
    import pathlib
    import runpy

    from rlcore import GRPOConfig, ModelConfig

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "game2048_grpo.py"
    example = runpy.run_path(str(path))
    assert isinstance(example["model"], ModelConfig) and isinstance(example["config"], GRPOConfig)
    assert [type(r) for r in example["rewards"]] == [FunctionWorks, NoCheating, StrategySucceeds]
    rows = example["dataset"]()
    assert len(rows) == 100 and rows[0]["prompt"][0]["role"] == "user"
    assert len(example["dataset"](8)) == 8
    with pytest.raises(ValueError, match="'dataset' must be a number of rows"):
        example["dataset"]("many")
    fields = {f.name for f in dataclasses.fields(GRPOConfig)} | {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(example["tiny"]) <= fields, set(example["tiny"]) - fields
    # The prompt's own format example is a valid, allowed strategy.
    template = "```python\n" + extract_function(example["PROMPT"]) + "```"
    assert NoCheating()([""], [template]) == [1.0]
