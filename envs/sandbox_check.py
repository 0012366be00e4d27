"""Static (AST) screening of untrusted Python code before it is run in the sandbox.

This is the first of two layers: it rejects code that imports anything outside a small allow-list or
reaches for the usual escape hatches (dunder attributes, ``eval``/``exec``, ``open``, frames...). The
second layer, the locked-down worker process (:mod:`rlcore.envs.sandbox`), must hold on its own, because
no static check of Python can be complete.
"""

from __future__ import annotations

import ast
from typing import Any

# Pure-computation modules a game strategy may reasonably use. Anything else is rejected.
ALLOWED_MODULES: frozenset[str] = frozenset({
    "math", "cmath", "random", "itertools", "functools", "collections", "collections.abc", "heapq",
    "bisect", "copy", "typing", "dataclasses", "operator", "statistics", "string", "re", "enum",
    "fractions", "decimal", "numbers", "array", "abc",
})

# Named explicitly so the report says "forbidden" (not just "not allowed") for known escape routes.
KNOWN_DANGEROUS_MODULES: frozenset[str] = frozenset({
    "os", "sys", "subprocess", "socket", "ctypes", "gc", "inspect", "importlib", "builtins", "io",
    "pathlib", "shutil", "signal", "threading", "_thread", "multiprocessing", "concurrent", "pickle",
    "marshal", "posix", "pty", "resource", "select", "selectors", "asyncio", "code", "codeop", "types",
    "weakref", "tempfile", "urllib", "http", "requests", "ssl", "mmap", "fcntl", "faulthandler", "atexit",
    "sysconfig", "site", "runpy", "pkgutil", "zipimport", "traceback", "linecache", "tracemalloc", "dis",
    "_socket", "_posixsubprocess", "__builtin__", "__builtins__",
})

# Attribute names that, on an allowed module, are references to dangerous ones (``random._os``,
# ``typing.sys``, ``dataclasses.inspect``); kept narrow so ordinary names like ``self.code`` pass.
MODULE_REFERENCE_ATTRIBUTES: frozenset[str] = frozenset({
    "os", "sys", "subprocess", "socket", "ctypes", "gc", "inspect", "importlib", "builtins", "thread",
    "threading", "posix", "marshal", "pickle", "signal", "shutil", "pathlib", "multiprocessing", "weakref",
    "types", "io", "copyreg",
})

# Builtins that run or load code, reach the interpreter's namespaces, or touch the outside world.
FORBIDDEN_NAMES: frozenset[str] = frozenset({
    "eval", "exec", "compile", "open", "__import__", "globals", "locals", "vars", "breakpoint", "input",
    "help", "exit", "quit", "memoryview", "__builtins__", "__loader__", "__spec__", "copyright", "credits",
    "license",
})

# Names that only make sense as attribute *names*: getattr and friends with these are escapes.
_ATTRIBUTE_BUILTINS = frozenset({"getattr", "setattr", "delattr", "hasattr"})

# Dunder attributes that cannot lead anywhere (needed for ordinary classes: ``super().__init__()``).
HARMLESS_DUNDERS: frozenset[str] = frozenset({"__init__", "__name__", "__doc__", "__main__"})

# Frame, code and generator internals: the way from a function to its callers' globals.
INTROSPECTION_ATTRIBUTES: frozenset[str] = frozenset({
    "f_globals", "f_locals", "f_back", "f_builtins", "f_code", "tb_frame", "tb_next", "gi_frame", "gi_code",
    "cr_frame", "cr_code", "ag_frame", "ag_code", "co_code", "co_consts", "func_globals", "mro",
})


def check_python_modules(code: str) -> tuple[bool, dict[str, Any]]:
    """Statically screens ``code``. Returns ``(ok, info)``.

    ``info`` has ``modules`` (top-level names of everything imported, sorted), ``forbidden_modules`` (the
    imported ones not in :data:`ALLOWED_MODULES`), ``violations`` (``"line N: reason"`` for every problem,
    imports included) and ``error`` (the syntax error message, or None). ``ok`` is True only when the code
    parses and has no violation.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    info: dict[str, Any] = {"modules": [], "forbidden_modules": [], "violations": [], "error": None}
    try:
        tree = ast.parse(code)
    except SyntaxError as error:
        info["error"] = f"SyntaxError: {error.msg} (line {error.lineno})"
        return False, info
    except (ValueError, RecursionError, MemoryError) as error:  # null bytes, absurd nesting
        info["error"] = f"{type(error).__name__}: {error}"
        return False, info
    visitor = _Screen()
    try:
        visitor.visit(tree)
    except RecursionError:
        info["error"] = "RecursionError: code is nested too deeply to check"
        return False, info
    info["modules"] = sorted(visitor.modules)
    info["forbidden_modules"] = sorted(visitor.forbidden_modules)
    info["violations"] = visitor.violations
    return not visitor.violations, info


def is_allowed_module(dotted: str) -> bool:
    """True for an allow-listed module or a submodule whose full dotted name is allow-listed."""
    return dotted in ALLOWED_MODULES


class _Screen(ast.NodeVisitor):
    def __init__(self) -> None:
        self.modules: set[str] = set()
        self.forbidden_modules: set[str] = set()
        self.violations: list[str] = []

    def _flag(self, node: ast.AST, reason: str) -> None:
        self.violations.append(f"line {getattr(node, 'lineno', '?')}: {reason}")

    def _import(self, node: ast.AST, dotted: str) -> None:
        top = dotted.split(".")[0]
        self.modules.add(top)
        if not is_allowed_module(dotted):
            self.forbidden_modules.add(top)
            kind = "forbidden" if top in KNOWN_DANGEROUS_MODULES else "not allowed"
            self._flag(node, f"import of {dotted!r} is {kind}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._import(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            self._flag(node, "relative imports are not allowed")
            return
        module = node.module or ""
        self._import(node, module)
        for alias in node.names:
            # "from collections import abc" names a submodule; it must be allowed in its own right.
            if alias.name == "*":
                self._flag(node, f"'from {module} import *' is not allowed")
            elif alias.name.startswith("_"):
                self._flag(node, f"importing private name {alias.name!r} from {module!r}")

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in FORBIDDEN_NAMES:
            self._flag(node, f"use of {node.id!r} is forbidden")
        elif _is_dunder(node.id) and node.id not in HARMLESS_DUNDERS:
            self._flag(node, f"use of {node.id!r} is forbidden")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._check_attribute_name(node, node.attr)
        self.generic_visit(node)

    def _check_attribute_name(self, node: ast.AST, attr: str) -> None:
        if _is_dunder(attr) and attr not in HARMLESS_DUNDERS:
            self._flag(node, f"access to dunder attribute {attr!r} is forbidden")
        elif attr in INTROSPECTION_ATTRIBUTES:
            self._flag(node, f"access to introspection attribute {attr!r} is forbidden")
        elif attr.lstrip("_") in MODULE_REFERENCE_ATTRIBUTES:
            self._flag(node, f"access to attribute {attr!r} (a module reference) is forbidden")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in _ATTRIBUTE_BUILTINS:
            if len(node.args) < 2:
                self._flag(node, f"{func.id}() without an attribute name")
            else:
                name = node.args[1]
                if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                    self._flag(node, f"{func.id}() with a computed attribute name is forbidden")
                else:
                    self._check_attribute_name(node, name.value)
                    if name.value.startswith("_"):
                        self._flag(node, f"{func.id}() of private attribute {name.value!r} is forbidden")
        elif isinstance(func, ast.Attribute) and func.attr in {"format", "format_map"}:
            # "{0.__class__}".format(x) walks attributes inside the string.
            if isinstance(func.value, ast.Constant) and isinstance(func.value.value, str) \
                    and "._" in func.value.value:
                self._flag(node, "format string that reads private attributes is forbidden")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        # Dunder names spelled in a string are only needed to look attributes up dynamically.
        if isinstance(node.value, str):
            for dunder in _DANGEROUS_DUNDERS:
                if dunder in node.value:
                    self._flag(node, f"string mentioning {dunder!r} is forbidden")
                    break


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


_DANGEROUS_DUNDERS = (
    "__class__", "__base__", "__bases__", "__mro__", "__subclasses__", "__globals__", "__builtins__",
    "__import__", "__dict__", "__code__", "__closure__", "__getattribute__", "__reduce__", "__loader__",
    "__self__", "__func__", "__module__", "__spec__",
)
