"""Runs untrusted Python functions in locked-down worker processes.

Two layers, each meant to hold without the other:

* :func:`check_python_modules` screens the code's AST (allow-listed imports only, no dunder attributes,
  no ``eval``/``exec``/``open``...). It runs in this process and executes nothing.
* :class:`LockedDownFunction` runs the code in a separate worker process (``subprocess`` + a stdlib-only
  script, so nothing of this process, torch included, is forked) that has restricted builtins and
  kernel-enforced limits: CPU seconds, address space, no new processes or threads, no new file
  descriptors (so no files, sockets or pipes can be opened), no file writes, no core dumps. When this
  process is root the worker also chroots into an empty directory, becomes an unprivileged uid of its
  own and, where ``unshare`` works, gets an empty network namespace. This process enforces a wall-clock
  timeout per call and caps what it reads back; the worker only ever returns JSON data.

A worker loads the code once and then answers many calls over a pipe (tens of microseconds per call), so a
whole game costs milliseconds. A worker that times out or dies is killed, reaped and replaced on the next
call. :class:`WorkerPool` keeps warm, not-yet-loaded workers so loading new code does not wait for an
interpreter to start, and bounds how many run at once.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

from .sandbox_check import ALLOWED_MODULES, check_python_modules

__all__ = [
    "LockedDownFunction",
    "SandboxLimits",
    "SandboxResult",
    "WorkerPool",
    "check_python_modules",
    "create_locked_down_function",
    "default_pool",
    "sandbox_protections",
]

STATUSES = ("ok", "timeout", "memory", "forbidden", "error")
_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_worker.py")
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one worker process.

    Attributes:
        timeout: wall-clock seconds for one call, enforced by this process (the worker is killed).
        load_timeout: wall-clock seconds to start the worker and run the code's top level.
        cpu_seconds: CPU seconds for the worker's whole life (RLIMIT_CPU), a backstop to ``timeout``.
        memory_bytes: address-space limit of the worker (RLIMIT_AS); exceeding it gives status "memory".
        max_stdout_chars: printed output kept per call; the rest is dropped (and counted).
        max_return_bytes: largest JSON reply accepted from the worker, return value and stdout included.
        drop_privileges: when running as root, chroot the worker into an empty directory and give it an
            unprivileged uid of its own (ignored when not root).
        network_namespace: when running as root, start the worker in an empty network namespace with
            ``unshare --net`` if that works here.
    """

    timeout: float = 2.0
    load_timeout: float = 10.0
    cpu_seconds: int = 30
    memory_bytes: int = 512 * 1024 * 1024
    max_stdout_chars: int = 10_000
    max_return_bytes: int = 1_000_000
    drop_privileges: bool = True
    network_namespace: bool = True

    def __post_init__(self) -> None:
        for name in ("timeout", "load_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 86_400:
                raise ValueError(f"SandboxLimits.{name} must be a number of seconds in (0, 86400), got {value!r}")
        minimums = {"cpu_seconds": 1, "memory_bytes": 64 * 1024 * 1024, "max_stdout_chars": 0,
                    "max_return_bytes": 1024}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"SandboxLimits.{name} must be an int >= {minimum}, got {value!r}")


@dataclass
class SandboxResult:
    """What one sandboxed load or call gave.

    ``status`` is one of "ok", "timeout" (wall clock or CPU limit), "memory" (address-space limit),
    "forbidden" (rejected by the static check, nothing ran) or "error" (an exception, a crash, a value
    that is not plain data); ``message`` says what happened; ``value`` is the return value (JSON data:
    str, int, float, bool, None, list, dict) when status is "ok".
    """

    status: str
    value: Any = None
    message: str = ""
    stdout: str = ""
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Failure(Exception):
    def __init__(self, result: SandboxResult) -> None:
        super().__init__(result.message)
        self.result = result


_LIVE_WORKERS: weakref.WeakSet[_Worker] = weakref.WeakSet()


class _Worker:
    """One worker process and its pipes; not thread-safe (its owner serialises calls)."""

    _counter = 0
    _counter_lock = threading.Lock()

    def __init__(self, limits: SandboxLimits) -> None:
        self.limits = limits
        self.workdir = tempfile.mkdtemp(prefix="rlcore-sandbox-")
        self.protections: dict[str, Any] = {}
        self._ready = False
        self._next_id = 0
        config = {
            "allowed_modules": sorted(ALLOWED_MODULES),
            "workdir": self.workdir,
            "cpu_seconds": limits.cpu_seconds,
            "memory_bytes": limits.memory_bytes,
            "max_stdout_chars": limits.max_stdout_chars,
            "max_return_bytes": limits.max_return_bytes,
            "uid": _unprivileged_uid(self._take_number()) if limits.drop_privileges and _is_root() else None,
            "network_namespace": False,
        }
        command = [sys.executable, "-I", "-S", _WORKER_SCRIPT]
        if limits.network_namespace and _is_root() and _unshare_net_works():
            command = [_unshare_net_works(), "--net", "--", *command]
            config["network_namespace"] = True
        try:
            self.process = subprocess.Popen(
                [*command, json.dumps(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, env={}, cwd=self.workdir)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self._write_fd = self.process.stdin.fileno()
        self._read_fd = self.process.stdout.fileno()
        os.set_blocking(self._write_fd, False)
        self._poll_in = select.poll()
        self._poll_in.register(self._read_fd, select.POLLIN)
        self._poll_out = select.poll()
        self._poll_out.register(self._write_fd, select.POLLOUT)
        self._finalizer = weakref.finalize(self, _kill_process, self.process, self.workdir, os.getpid())
        _LIVE_WORKERS.add(self)

    @classmethod
    def _take_number(cls) -> int:
        with cls._counter_lock:
            cls._counter += 1
            return cls._counter

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and self.process.poll() is None

    def wait_ready(self, deadline: float) -> None:
        if self._ready:
            return
        reply = self._receive(deadline, what="starting the worker")
        if reply.get("op") != "ready":
            self._fail("error", "the worker did not start properly")
        self.protections = reply.get("protections", {})
        self._ready = True

    def request(self, message: dict[str, Any], timeout: float, what: str) -> dict[str, Any]:
        """Sends one request and returns the reply; raises _Failure (the worker is then dead)."""
        deadline = time.monotonic() + timeout
        self.wait_ready(deadline)
        self._next_id += 1
        message["id"] = self._next_id
        body = json.dumps(message).encode()
        self._write_all(len(body).to_bytes(4, "big") + body, deadline, what)
        reply = self._receive(deadline, what)
        if reply.get("id") != self._next_id:
            self._fail("error", "the worker's reply does not match the request")
        return reply

    def kill(self) -> None:
        self._finalizer()

    def _write_all(self, data: bytes, deadline: float, what: str) -> None:
        view = memoryview(data)
        while view:
            if not self._poll_out.poll(self._poll_ms(deadline, what)):
                continue
            try:
                written = os.write(self._write_fd, view)
            except BlockingIOError:
                continue
            except (BrokenPipeError, OSError):
                self._fail_dead(what)
            view = view[written:]

    def _receive(self, deadline: float, what: str) -> dict[str, Any]:
        size = int.from_bytes(self._read_exact(4, deadline, what), "big")
        if size > self.limits.max_return_bytes + 4096:
            self._fail("error", f"the worker sent {size} bytes, more than max_return_bytes")
        try:
            reply = json.loads(self._read_exact(size, deadline, what))
        except ValueError:
            self._fail("error", "the worker sent a malformed reply")
        if not isinstance(reply, dict):
            self._fail("error", "the worker sent a malformed reply")
        return reply

    def _read_exact(self, n: int, deadline: float, what: str) -> bytes:
        data = bytearray()
        while len(data) < n:
            if not self._poll_in.poll(self._poll_ms(deadline, what)):
                continue
            chunk = os.read(self._read_fd, n - len(data))
            if not chunk:
                self._fail_dead(what)
            data += chunk
        return bytes(data)

    def _poll_ms(self, deadline: float, what: str) -> int:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._fail("timeout", f"timed out {what}")
        return max(1, int(remaining * 1000) + 1)

    def _fail(self, status: str, message: str) -> None:
        self.kill()
        raise _Failure(SandboxResult(status, message=message))

    def _fail_dead(self, what: str) -> None:
        try:
            code = self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
        self.kill()
        if code is not None and code < 0:
            number = -code
            name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
            if number in (signal.SIGXCPU, signal.SIGKILL):
                raise _Failure(SandboxResult("timeout", message=f"CPU time limit exceeded {what} ({name})"))
            raise _Failure(SandboxResult("error", message=f"the worker crashed {what} ({name})"))
        raise _Failure(SandboxResult("error", message=f"the worker exited {what} (exit code {code})"))


def _kill_process(process: subprocess.Popen, workdir: str, owner: int) -> None:
    """Kills the worker (and anything in its session), reaps it and removes its directory."""
    if os.getpid() != owner:  # a forked copy of this process exiting must not kill the owner's workers
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.kill()
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pass
    for stream in (process.stdin, process.stdout):
        try:
            stream.close()
        except OSError:
            pass
    shutil.rmtree(workdir, ignore_errors=True)


@atexit.register
def _kill_all_workers() -> None:
    for worker in list(_LIVE_WORKERS):
        worker.kill()


class LockedDownFunction:
    """A function defined by untrusted ``code``, run in a locked-down worker process.

    Calling it returns a :class:`SandboxResult` (never raises for anything the code does). The worker is
    started and the code loaded on first use (or by :meth:`load`); after a timeout or crash the worker is
    killed and the next call starts a fresh one. Arguments and return values must be JSON data. Use it as
    a context manager, or call :meth:`close`, to stop the worker early; it is also stopped when garbage
    collected and at interpreter exit.
    """

    def __init__(self, code: str, name: str = "strategy", *, limits: SandboxLimits | None = None,
                 check: bool = True, pool: WorkerPool | None = None) -> None:
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name must be a Python identifier, got {name!r}")
        self.code = code
        self.name = name
        self.limits = limits or (pool.limits if pool is not None else SandboxLimits())
        self._pool = pool
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._rejection: SandboxResult | None = None
        self.check_info: dict[str, Any] = {}
        if check:
            ok, info = check_python_modules(code)
            self.check_info = info
            if not ok:
                if info["error"]:
                    self._rejection = SandboxResult("error", message=info["error"], info=info)
                else:
                    self._rejection = SandboxResult("forbidden", message="; ".join(info["violations"]), info=info)

    @property
    def protections(self) -> dict[str, Any]:
        """What the current worker reported about its process-level protections (empty before start)."""
        return dict(self._worker.protections) if self._worker is not None else {}

    @property
    def pid(self) -> int | None:
        worker = self._worker
        return worker.process.pid if worker is not None and worker.alive else None

    def load(self) -> SandboxResult:
        """Starts a worker and runs the code's top level, unless already done; "ok" if the function exists."""
        with self._lock:
            return self._ensure_loaded()

    def __call__(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> SandboxResult:
        """Runs the function on JSON-able ``args``; ``timeout`` overrides ``limits.timeout`` for this call."""
        with self._lock:
            loaded = self._ensure_loaded()
            if not loaded.ok:
                return loaded
            start = time.perf_counter()
            try:
                reply = self._worker.request({"op": "call", "args": list(args), "kwargs": kwargs},
                                             timeout or self.limits.timeout, "running the function")
            except _Failure as failure:
                self._worker = None
                failure.result.seconds = time.perf_counter() - start
                return failure.result
            result = _result_from_reply(reply, time.perf_counter() - start)
            if result.status == "memory":
                self._drop_worker()  # its heap may be in a poor state; start clean next time
            return result

    def close(self) -> None:
        with self._lock:
            self._drop_worker()

    def __enter__(self) -> LockedDownFunction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker = None

    def _ensure_loaded(self) -> SandboxResult:
        if self._rejection is not None:
            return self._rejection
        if self._worker is not None and self._worker.alive:
            return SandboxResult("ok")
        start = time.perf_counter()
        worker = self._pool.take_worker(self.limits) if self._pool is not None else _Worker(self.limits)
        try:
            reply = worker.request({"op": "load", "code": self.code, "name": self.name},
                                   self.limits.load_timeout, "loading the code")
        except _Failure as failure:
            failure.result.seconds = time.perf_counter() - start
            return failure.result
        result = _result_from_reply(reply, time.perf_counter() - start)
        if result.ok:
            self._worker = worker
        else:
            worker.kill()
        return result


def _result_from_reply(reply: dict[str, Any], seconds: float) -> SandboxResult:
    status = reply.get("status")
    if status not in ("ok", "memory", "error"):
        return SandboxResult("error", message=f"the worker sent an unknown status {status!r}", seconds=seconds)
    stdout = reply.get("stdout", "")
    return SandboxResult(status, value=reply.get("value"), message=str(reply.get("message", "")),
                         stdout=stdout if isinstance(stdout, str) else "", seconds=seconds)


def create_locked_down_function(code: str, name: str = "strategy", *, limits: SandboxLimits | None = None,
                                check: bool = True, pool: WorkerPool | None = None) -> LockedDownFunction:
    """Returns a callable running ``name`` from ``code`` in a locked-down worker process.

    With ``check=True`` (the default) the code is first screened by :func:`check_python_modules` and every
    call of rejected code returns status "forbidden" ("error" for a syntax error) without running
    anything. ``check=False`` skips that screen and relies on the process-level limits alone; it exists to
    test those limits. ``pool`` supplies an already started worker.
    """
    return LockedDownFunction(code, name, limits=limits, check=check, pool=pool)


class WorkerPool:
    """Warm workers and a bound on parallelism for running many untrusted functions.

    ``function(code)`` gives a :class:`LockedDownFunction` that starts from an already running worker
    (each worker serves one piece of code and is then discarded: code never shares a process with other
    code). ``map(fn, items)`` runs ``fn`` over ``items`` with at most ``max_workers`` at once.
    """

    def __init__(self, max_workers: int = 2, limits: SandboxLimits | None = None, spares: int | None = None) -> None:
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
            raise ValueError(f"WorkerPool.max_workers must be an int >= 1, got {max_workers!r}")
        spares = max_workers if spares is None else spares
        if not isinstance(spares, int) or spares < 0:
            raise ValueError(f"WorkerPool.spares must be an int >= 0, got {spares!r}")
        self.max_workers = max_workers
        self.limits = limits or SandboxLimits()
        self.spares = spares
        self._lock = threading.Lock()
        self._stock: list[_Worker] = []
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    def function(self, code: str, name: str = "strategy", *, check: bool = True) -> LockedDownFunction:
        return LockedDownFunction(code, name, limits=self.limits, check=check, pool=self)

    def map(self, fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
        """``[fn(item) for item in items]``, at most ``max_workers`` at a time, in order."""
        items = list(items)
        if len(items) <= 1 or self.max_workers == 1:
            return [fn(item) for item in items]
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="rlcore-sandbox")
            executor = self._executor
        return list(executor.map(fn, items))

    def take_worker(self, limits: SandboxLimits) -> _Worker:
        """A started worker with ``limits``; the stock is refilled right away (start-up overlaps use)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this WorkerPool is closed")
            worker = None
            if limits == self.limits:
                while self._stock and worker is None:
                    candidate = self._stock.pop(0)
                    if candidate.alive:
                        worker = candidate
                    else:
                        candidate.kill()
                while len(self._stock) < self.spares:
                    self._stock.append(_Worker(self.limits))
        return worker if worker is not None else _Worker(limits)

    def warm_up(self) -> None:
        """Starts the spare workers now rather than on first use."""
        with self._lock:
            while not self._closed and len(self._stock) < self.spares:
                self._stock.append(_Worker(self.limits))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stock, self._stock = self._stock, []
            executor, self._executor = self._executor, None
        for worker in stock:
            worker.kill()
        if executor is not None:
            executor.shutdown(wait=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_DEFAULT_POOL: WorkerPool | None = None
_DEFAULT_POOL_LOCK = threading.Lock()


def default_pool() -> WorkerPool:
    """A process-wide pool with ``min(2, cpu count)`` workers and default limits, made on first use."""
    global _DEFAULT_POOL
    with _DEFAULT_POOL_LOCK:
        if _DEFAULT_POOL is None or _DEFAULT_POOL._closed:
            _DEFAULT_POOL = WorkerPool(max_workers=max(1, min(2, os.cpu_count() or 1)))
        return _DEFAULT_POOL


def sandbox_protections(limits: SandboxLimits | None = None) -> dict[str, Any]:
    """Starts one worker and returns the process-level protections it reports, e.g.
    ``{"chroot": True, "privileges_dropped": True, "uid": 1000123, "network_namespace": True}``."""
    function = LockedDownFunction("def f():\n    return 0\n", "f", limits=limits)
    try:
        result = function.load()
        if not result.ok:
            raise RuntimeError(f"the sandbox worker failed to start: {result.message}")
        return function.protections
    finally:
        function.close()


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@lru_cache(maxsize=1)
def _unshare_net_works() -> str | None:
    """The path of ``unshare`` if ``unshare --net`` runs here (root in a permissive container), else None."""
    path = shutil.which("unshare") or next((p for p in ("/usr/bin/unshare", "/bin/unshare") if os.path.exists(p)), None)
    if path is None:
        return None
    try:
        done = subprocess.run([path, "--net", "--", "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=10, env={})
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if done.returncode == 0 else None


@lru_cache(maxsize=1)
def _uid_range() -> tuple[int, int]:
    """A range of uids this (root) process can switch to and that no real user is likely to have."""
    try:
        with open("/proc/self/uid_map") as handle:
            ranges = [tuple(int(x) for x in line.split()) for line in handle if line.strip()]
    except OSError:
        ranges = []
    # A full map (no user namespace, or an identity one) allows any uid: use a high, unused block.
    if any(start == 0 and length >= 2**32 - 1 for start, _, length in ranges):
        return 1_000_000_000, 1_900_000_000
    # Otherwise stay inside the mapped ids, above ordinary system and login accounts.
    best = max(((start, start + length) for start, _, length in ranges), key=lambda r: r[1] - r[0], default=(0, 65535))
    low, high = max(best[0], 20_000), min(best[1], 65_534)
    return (low, high) if high - low > 100 else (65_534, 65_535)


def _unprivileged_uid(number: int) -> int:
    # Distinct per worker (pid and counter mixed in) so that workers cannot signal each other.
    low, high = _uid_range()
    return low + (os.getpid() * 7919 + number) % (high - low)
