"""Runs untrusted Python functions in locked-down worker processes.

* :func:`check_python_modules` screens the code's AST (allow-listed imports only, no dunder attributes,
  no ``eval``/``exec``/``open``...). It runs in this process and executes nothing. It is a convenience
  (early, readable rejections), not the wall: no static check of Python is complete.
* :class:`LockedDownFunction` runs the code in a separate worker process (``subprocess`` + a stdlib-only
  script, so nothing of this process, torch included, is forked) that confines itself before it receives
  the code, with what an unprivileged Linux process can use, and holds even if the code reaches the
  worker's real ``os`` module:

  ===================  ====================================================================================
  seccomp (required)   allow-list of syscalls (:mod:`rlcore.envs.seccomp_filter`, compiled by libseccomp):
                       no open, socket, kill, ptrace, execve, fork/clone, mount...; read only the request
                       pipe, write only the response pipe; no executable memory. Applies to every thread.
  namespaces           own user (not root), network and mount namespaces; the root directory is an empty
                       read-only tmpfs (no ``/proc``, no files); no capabilities. As root: own network
                       and mount namespaces, the empty root, and an unprivileged uid of its own (where
                       namespaces are refused, a chroot into an empty directory that the next worker start
                       removes should this process be killed).
  landlock             no file access, no TCP, no signals or abstract sockets outside the worker.
  always               no_new_privs; every inherited fd closed but the two pipes; rlimits: CPU seconds,
                       address space, no new processes/threads/fds, no file writes, no core dumps.
  ===================  ====================================================================================

  A layer the kernel refuses is reported in :attr:`LockedDownFunction.protections` (``unavailable`` says
  why). Those in ``SandboxLimits.required_layers`` (seccomp by default) fail closed: no code runs and
  :class:`SandboxUnavailableError` says which layer is missing and how to opt out. A worker started without
  seccomp (opted out) logs a warning every time; another missing layer is logged once per process.

This process treats the worker as hostile: it enforces a wall-clock timeout per call, caps what it reads back,
and turns any reply that is not a small, shallow JSON object answering the request into status "error".

A worker loads the code once and then answers many calls over a pipe (tens of microseconds per call), so a
whole game costs milliseconds. A worker that times out or dies is killed, reaped and replaced on the next
call. :class:`WorkerPool` keeps warm, not-yet-loaded workers so loading new code does not wait for an
interpreter to start, and bounds how many run at once.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
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
from typing import Any, TypeVar

from . import seccomp_filter
from .sandbox_check import ALLOWED_MODULES, check_python_modules

__all__ = [
    "LockedDownFunction",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailableError",
    "WorkerPool",
    "check_python_modules",
    "create_locked_down_function",
    "default_pool",
    "sandbox_protections",
]

STATUSES = ("ok", "timeout", "memory", "forbidden", "error")
LAYERS = ("seccomp", "landlock", "namespaces")
MAX_REPLY_DEPTH = 64
_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_worker.py")
_logger = logging.getLogger(__name__)
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
        drop_privileges: when running as root, give the worker an unprivileged uid of its own (ignored
            when not root).
        namespaces: put the worker in its own user (when not root), network and mount namespaces with an
            empty read-only root directory, where the kernel allows it; as root without namespaces the
            worker chroots into an empty directory instead.
        required_layers: layers (of "seccomp", "landlock", "namespaces") without which no code runs: a worker
            that cannot apply one raises :class:`SandboxUnavailableError`. Leaving "seccomp" out is an
            explicit opt-out of the wall, logged as a warning at every worker start where it is missing.
    """

    timeout: float = 2.0
    load_timeout: float = 10.0
    cpu_seconds: int = 30
    memory_bytes: int = 512 * 1024 * 1024
    max_stdout_chars: int = 10_000
    max_return_bytes: int = 1_000_000
    drop_privileges: bool = True
    namespaces: bool = True
    required_layers: tuple[str, ...] = ("seccomp",)

    def __post_init__(self) -> None:
        for name in ("drop_privileges", "namespaces"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SandboxLimits.{name} must be a bool, got {getattr(self, name)!r}")
        layers = self.required_layers
        if isinstance(layers, str) or not isinstance(layers, (tuple, list, frozenset, set)) \
                or any(layer not in LAYERS for layer in layers):
            raise ValueError(f"SandboxLimits.required_layers must be a tuple of layer names from {LAYERS}, "
                             f"got {layers!r}")
        if "namespaces" in layers and not self.namespaces:
            raise ValueError("SandboxLimits.required_layers names 'namespaces' but namespaces=False")
        object.__setattr__(self, "required_layers", tuple(sorted(set(layers), key=LAYERS.index)))
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


class SandboxUnavailableError(RuntimeError):
    """This machine cannot give a worker a layer that ``SandboxLimits.required_layers`` requires, or the
    worker could not set itself up at all (reported before any code is sent to it).

    A property of the host (kernel, container, missing libseccomp), not of the code: no code is run, and
    the message names the layer, the kernel's reason and the opt-out.
    """


class _Failure(Exception):
    def __init__(self, result: SandboxResult) -> None:
        super().__init__(result.message)
        self.result = result


_LIVE_WORKERS: weakref.WeakSet[_Worker] = weakref.WeakSet()
_WARNED: set[tuple[str, str]] = set()  # best-effort layers already reported missing in this process
_WARNED_LOCK = threading.Lock()


class _Worker:
    """One worker process and its pipes; not thread-safe (its owner serialises calls).

    Raises _Failure (status "error" saying why) when the process cannot be started, e.g. when this
    process has no file descriptors left for its pipes.
    """

    _counter = 0
    _counter_lock = threading.Lock()

    def __init__(self, limits: SandboxLimits) -> None:
        self.limits = limits
        self.protections: dict[str, Any] = {}
        self._ready = False
        self._next_id = 0
        number = self._take_number()
        root = _is_root()
        self.fallback_root: str | None = None
        try:
            if root:
                # Only a root worker whose kernel refuses namespaces needs a directory (to chroot into); it
                # creates it in a per-user parent that every start cleans of those whose owner is gone.
                self.fallback_root = os.path.join(_worker_dirs(), f"{os.getpid()}-{number}")
                _remove_stale_worker_dirs()
        except OSError as error:  # tempfile finds no usable directory, e.g. without file descriptors
            raise _Failure(SandboxResult("error", message=_start_error(error))) from None
        config = {
            "allowed_modules": sorted(ALLOWED_MODULES),
            "cpu_seconds": limits.cpu_seconds,
            "memory_bytes": limits.memory_bytes,
            "max_stdout_chars": limits.max_stdout_chars,
            "max_return_bytes": limits.max_return_bytes,
            "uid": _unprivileged_uid(number) if limits.drop_privileges and root else None,
            "namespaces": limits.namespaces,
            "fallback_root": self.fallback_root,
            "libseccomp": list(seccomp_filter.LIBRARY_NAMES),
        }
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", _WORKER_SCRIPT, json.dumps(config)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, env={},
                cwd="/")
        except OSError as error:
            _remove_worker_dir(self.fallback_root)
            raise _Failure(SandboxResult("error", message=_start_error(error))) from None
        self._write_fd = self.process.stdin.fileno()
        self._read_fd = self.process.stdout.fileno()
        self._finalizer = weakref.finalize(self, _kill_process, self.process, self.fallback_root, os.getpid())
        os.set_blocking(self._write_fd, False)
        self._poll_in = select.poll()
        self._poll_in.register(self._read_fd, select.POLLIN)
        self._poll_out = select.poll()
        self._poll_out.register(self._write_fd, select.POLLOUT)
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
        """Waits for the worker's report of its layers; raises SandboxUnavailableError if one required is missing."""
        if self._ready:
            return
        reply = self._receive(deadline, what="starting the worker")
        if reply.get("op") == "failed":  # before any code was sent: a property of this host, not of the code
            self.kill()
            raise SandboxUnavailableError(f"the sandbox worker could not set itself up here: "
                                          f"{str(reply.get('message'))[:2000]}")
        protections = reply.get("protections")
        if reply.get("op") != "ready" or not isinstance(protections, dict):
            self._fail("error", "the worker did not start properly")
        self.protections = protections
        self._check_layers()
        self._ready = True

    def _check_layers(self) -> None:
        unavailable = self.protections.get("unavailable")
        unavailable = unavailable if isinstance(unavailable, dict) else {}
        active = _active_layers(self.protections)
        for layer in LAYERS:
            if active[layer] or (layer == "namespaces" and not self.limits.namespaces):
                continue
            reason = str(unavailable.get(layer, "not reported by the worker"))
            if layer in self.limits.required_layers:
                self.kill()
                weaker = tuple(name for name in self.limits.required_layers if name != layer)
                raise SandboxUnavailableError(
                    f"the sandbox layer {layer!r} is unavailable here ({reason}), and "
                    f"SandboxLimits.required_layers={self.limits.required_layers!r} requires it, so no code is "
                    f"run. Fix the host (seccomp needs the OS package libseccomp2 / libseccomp), or opt out "
                    f"with SandboxLimits(required_layers={weaker!r}) to run untrusted code with weaker "
                    f"containment.")
            if layer == "seccomp":  # the opted-out wall: say so at every start
                _logger.warning("sandbox worker %s runs WITHOUT seccomp (%s): untrusted code is contained only by "
                                "the remaining layers %s", self.process.pid, reason,
                                [name for name in LAYERS if active[name]])
                continue
            with _WARNED_LOCK:
                first = (layer, reason) not in _WARNED
                _WARNED.add((layer, reason))
            if first:
                _logger.warning("sandbox layer %r is unavailable here (%s); workers run without it", layer, reason)

    def request(self, message: dict[str, Any], timeout: float, what: str) -> dict[str, Any]:
        """Sends one request and returns the checked reply; raises _Failure (the worker is then dead)."""
        deadline = time.monotonic() + timeout
        self.wait_ready(deadline)
        self._next_id += 1
        message["id"] = self._next_id
        body = json.dumps(message).encode()
        self._write_all(len(body).to_bytes(4, "big") + body, deadline, what)
        reply = self._receive(deadline, what)
        problem = _reply_problem(reply, self._next_id)
        if problem:
            self._fail("error", f"the worker sent an invalid reply {what}: {problem}")
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
            except OSError:
                self._fail_dead(what)
            view = view[written:]

    def _receive(self, deadline: float, what: str) -> dict[str, Any]:
        size = int.from_bytes(self._read_exact(4, deadline, what), "big")
        if size > self.limits.max_return_bytes + 4096:
            self._fail("error", f"the worker sent {size} bytes {what}, more than max_return_bytes")
        reply, problem = _decode_reply(self._read_exact(size, deadline, what))
        if problem:
            self._fail("error", f"the worker sent a malformed reply {what}: {problem}")
        return reply

    def _read_exact(self, n: int, deadline: float, what: str) -> bytes:
        data = bytearray()
        while len(data) < n:
            if not self._poll_in.poll(self._poll_ms(deadline, what)):
                continue
            try:
                chunk = os.read(self._read_fd, n - len(data))
            except OSError:
                chunk = b""
            if not chunk:
                self._fail_dead(what, truncated=bool(data))
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

    def _fail_dead(self, what: str, truncated: bool = False) -> None:
        try:
            code = self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
        self.kill()
        cut = " in the middle of a reply" if truncated else ""
        if code is not None and code < 0:
            number = -code
            name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
            if number in (signal.SIGXCPU, signal.SIGKILL):
                raise _Failure(SandboxResult("timeout", message=f"CPU time limit exceeded {what} ({name})"))
            raise _Failure(SandboxResult("error", message=f"the worker crashed {what}{cut} ({name})"))
        raise _Failure(SandboxResult("error", message=f"the worker exited {what}{cut} (exit code {code})"))


def _start_error(error: OSError) -> str:
    if error.errno in (errno.EMFILE, errno.ENFILE):
        return (f"could not start a sandbox worker: this process has no file descriptors left for the worker's "
                f"pipes ({error}); close files or raise the open-files limit (ulimit -n)")
    if error.errno in (errno.EAGAIN, errno.ENOMEM):
        return f"could not start a sandbox worker: the system refused a new process ({error})"
    return f"could not start a sandbox worker: {type(error).__name__}: {error}"


def _active_layers(protections: dict[str, Any]) -> dict[str, bool]:
    landlock = protections.get("landlock")
    return {
        "seccomp": protections.get("seccomp") is True,
        "landlock": isinstance(landlock, int) and not isinstance(landlock, bool) and landlock > 0,
        "namespaces": all(protections.get(key) is True for key in ("network_namespace", "mount_namespace", "chroot")),
    }


def _decode_reply(body: bytes) -> tuple[dict[str, Any], str]:
    """The reply as a dict and "" when it is a JSON object nested at most MAX_REPLY_DEPTH deep, else
    ({}, what is wrong): garbage bytes, invalid UTF-8, absurd nesting or integers all become a message."""
    try:
        reply = json.loads(body)
    except RecursionError:
        return {}, f"JSON nested deeper than {MAX_REPLY_DEPTH} levels"
    except (ValueError, MemoryError) as error:  # invalid JSON or UTF-8, integers over the digit limit
        return {}, f"not valid JSON ({type(error).__name__}: {str(error)[:200]})"
    if not isinstance(reply, dict):
        return {}, f"a JSON {type(reply).__name__}, not an object"
    if _too_deep(reply, MAX_REPLY_DEPTH):
        return {}, f"JSON nested deeper than {MAX_REPLY_DEPTH} levels"
    return reply, ""


def _too_deep(value: Any, limit: int) -> bool:
    """Whether lists/dicts in ``value`` nest more than ``limit`` levels (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))
    return False


def _reply_problem(reply: dict[str, Any], expected_id: int) -> str:
    """What is wrong with a load/call reply ("" if nothing): its id, status and text fields are checked."""
    if reply.get("id") != expected_id or isinstance(reply.get("id"), bool):
        return f"its id {str(reply.get('id'))[:50]!r} does not match the request's ({expected_id})"
    if reply.get("status") not in ("ok", "memory", "error"):
        return f"unknown status {str(reply.get('status'))[:50]!r}"
    for key in ("message", "stdout"):
        if not isinstance(reply.get(key, ""), str):
            return f"{key} is a {type(reply[key]).__name__}, not a string"
    return ""


def _kill_process(process: subprocess.Popen, fallback_root: str | None, owner: int) -> None:
    """Kills the worker (and anything in its session), reaps it and removes its directory, if it made one."""
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
    _remove_worker_dir(fallback_root)


def _worker_dirs() -> str:
    """The parent of the directories root workers chroot into when namespaces are refused (one per uid)."""
    return os.path.join(tempfile.gettempdir(), f"rlcore-sandbox-{os.getuid()}")


def _remove_worker_dir(path: str | None) -> None:
    if path is None:
        return
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(path))  # only succeeds once the last worker of every process is gone
    except OSError:
        pass


def _remove_stale_worker_dirs() -> None:
    """Removes worker directories left by processes that were killed (named ``<owner pid>-<number>``)."""
    parent = _worker_dirs()
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        owner = name.split("-")[0]
        if owner.isdigit() and not _process_exists(int(owner)):
            _remove_worker_dir(os.path.join(parent, name))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@atexit.register
def _kill_all_workers() -> None:
    for worker in list(_LIVE_WORKERS):
        worker.kill()


class LockedDownFunction:
    """A function defined by untrusted ``code``, run in a locked-down worker process.

    Calling it returns a :class:`SandboxResult`: nothing the code or a compromised worker does raises, and
    neither does a worker that cannot be started (e.g. no file descriptors left: status "error" saying
    so). Only a host that cannot provide a required layer raises :class:`SandboxUnavailableError`. The
    worker is started and the code loaded on first use (or by :meth:`load`); after a timeout or crash the
    worker is killed and the next call starts a fresh one. Arguments and return values must be JSON data.
    Use it as a context manager, or call :meth:`close`, to stop the worker early; it is also stopped when
    garbage collected and at interpreter exit.
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
        """The layers the current worker reported (empty before start): ``seccomp``, ``landlock`` (the ABI
        version, 0 if none), ``user_namespace``, ``network_namespace``, ``mount_namespace``, ``chroot``,
        ``no_new_privs``, ``capabilities`` (0: none left), ``uid``, ``privileges_dropped``, ``open_fds`` and
        ``unavailable`` (layer -> the kernel's reason)."""
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
        try:
            worker = self._pool.take_worker(self.limits) if self._pool is not None else _Worker(self.limits)
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
    # Already checked by _reply_problem: a known status, text fields that are strings, shallow JSON.
    return SandboxResult(reply["status"], value=reply.get("value"), message=reply.get("message", ""),
                         stdout=reply.get("stdout", ""), seconds=seconds)


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
        """A started worker with ``limits``; the stock is refilled right away (start-up overlaps use).

        Raises _Failure when no worker can be started; a spare that cannot be started is simply not made.
        """
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
                self._refill()
        return worker if worker is not None else _Worker(limits)

    def warm_up(self) -> None:
        """Starts the spare workers now rather than on first use."""
        with self._lock:
            if not self._closed:
                self._refill()

    def _refill(self) -> None:
        while len(self._stock) < self.spares:
            try:
                self._stock.append(_Worker(self.limits))
            except _Failure:  # e.g. no file descriptors left now; the caller's own start reports it
                return

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
    """Starts one worker and returns the layers it reports (see :attr:`LockedDownFunction.protections`), e.g.
    ``{"seccomp": True, "landlock": 7, "user_namespace": True, "network_namespace": True, "chroot": True,
    "uid": 1000, ...}``. Raises SandboxUnavailableError when a required layer is missing here."""
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


_UID_RANGE: tuple[int, int] | None = None


def _uid_range() -> tuple[int, int]:
    """A range of uids this (root) process can switch to and that no real user is likely to have."""
    global _UID_RANGE
    if _UID_RANGE is None:
        try:
            with open("/proc/self/uid_map") as handle:
                ranges = [tuple(int(x) for x in line.split()) for line in handle if line.strip()]
        except OSError:  # e.g. no file descriptor left: the safest choice now, the map again next time
            return 65_534, 65_535
        _UID_RANGE = _usable_uids(ranges)
    return _UID_RANGE


def _usable_uids(ranges: list[tuple[int, ...]]) -> tuple[int, int]:
    # A full map (no user namespace, or an identity one) allows any uid: use a high, unused block.
    if any(start == 0 and length >= 2**32 - 1 for start, _, length in ranges):
        return 1_000_000_000, 1_900_000_000
    # Otherwise stay inside the mapped ids, above ordinary system and login accounts.
    best = max(((start, start + length) for start, _, length in ranges), key=lambda r: r[1] - r[0],
               default=(0, 65535))
    low, high = max(best[0], 20_000), min(best[1], 65_534)
    return (low, high) if high - low > 100 else (65_534, 65_535)


def _unprivileged_uid(number: int) -> int:
    # Distinct per worker (pid and counter mixed in) so that workers cannot signal each other.
    low, high = _uid_range()
    return low + (os.getpid() * 7919 + number) % (high - low)
