"""How fast the sandbox answers: strategy calls per second, game moves per second, worker start-up.

    python benchmarks/sandbox_calls.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from rlcore.envs.game2048 import GameBoard, execute_strategy
from rlcore.envs.sandbox import WorkerPool, create_locked_down_function, sandbox_protections

STRATEGY = "def strategy(board):\n    return 'ASDW'[sum(map(sum, board)) % 4]\n"
# Plays properly (first move that changes the board, corner-first), so games end by winning or losing.
CORNER = """
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

    for m in "ASDW":
        if move(board, m) != board:
            return m
    return "W"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    layers = sandbox_protections()
    active = [name for name in ("seccomp", "landlock", "user_namespace", "network_namespace", "mount_namespace",
                                "chroot") if layers.get(name)]
    print(f"sandbox layers: {', '.join(active)} (worker uid {layers['uid']}; "
          f"unavailable: {layers['unavailable'] or 'none'})")

    starts = []
    for _ in range(5):
        start = time.perf_counter()
        with create_locked_down_function(STRATEGY) as function:
            function.load()
        starts.append(time.perf_counter() - start)
    print(f"cold start + load (fresh worker): {1000 * min(starts):.1f} ms (best of 5)")

    with WorkerPool(max_workers=1) as pool:
        pool.warm_up()
        time.sleep(0.5)  # let the spare finish starting, as it would between training steps
        start = time.perf_counter()
        function = pool.function(STRATEGY)
        function.load()
        print(f"warm start + load (pool spare): {1000 * (time.perf_counter() - start):.1f} ms")
        function.close()

    board = GameBoard(size=4, seed=0).board()
    with create_locked_down_function(STRATEGY) as function:
        function.load()
        start = time.perf_counter()
        for _ in range(args.calls):
            function(board)
        elapsed = time.perf_counter() - start
        print(f"strategy calls: {args.calls / elapsed:,.0f} calls/s ({1e6 * elapsed / args.calls:.0f} us per call)")

    with create_locked_down_function(CORNER) as function:
        function.load()

        moves, start = 0, time.perf_counter()
        games = 0
        while moves < args.calls:
            steps, _ = execute_strategy(function, GameBoard(size=4, seed=games, target=2048), max_steps=100_000,
                                        time_limit=60)
            moves, games = moves + steps, games + 1
        elapsed = time.perf_counter() - start
        print(f"2048 games (corner strategy, sandboxed): {moves / elapsed:,.0f} moves/s including game logic "
              f"({games} games, {moves / games:.0f} moves and {1000 * elapsed / games:.1f} ms per game)")


if __name__ == "__main__":
    main()
