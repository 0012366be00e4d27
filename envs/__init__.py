"""Sandboxed code execution and environments (2048, ...)."""

from .game2048 import Board, GameBoard, execute_strategy
from .sandbox import (LockedDownFunction, SandboxLimits, SandboxResult, WorkerPool, check_python_modules,
                      create_locked_down_function, default_pool, sandbox_protections)

__all__ = [
    "Board",
    "GameBoard",
    "LockedDownFunction",
    "SandboxLimits",
    "SandboxResult",
    "WorkerPool",
    "check_python_modules",
    "create_locked_down_function",
    "default_pool",
    "execute_strategy",
    "sandbox_protections",
]
