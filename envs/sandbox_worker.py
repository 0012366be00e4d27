"""The locked-down child process of :mod:`rlcore.envs.sandbox` (run as a script, never imported).

Started as ``python -I -S sandbox_worker.py CONFIG_JSON``: isolated mode, no site-packages, so it loads
only the standard library (no torch) and starts in tens of milliseconds. It then

1. keeps its request/response pipes on fds 3 and 4, points 0-2 at /dev/null and closes everything else,
2. imports the allow-listed modules and builds its seccomp filter (nothing can be loaded afterwards),
3. confines itself (:mod:`rlcore.envs.confinement`): namespaces and an empty root directory (as root also
   its own unprivileged uid), no capabilities, no_new_privs, Landlock,
4. starts the watchdog thread (exits when the parent dies), sets resource limits (CPU, address space, no
   new processes or threads, no new file descriptors, no file writes, no core dumps),
5. installs the seccomp allow-list (:mod:`rlcore.envs.seccomp_filter`) on both threads, the wall,
6. reports which layers are active ("ready", or "failed" with the reason) and only then answers ``load``
   (exec the code once) and ``call`` (run the function) requests, with restricted builtins and captured,
   truncated stdout.

Messages are a 4-byte big-endian length followed by UTF-8 JSON; the parent never unpickles anything from
here and checks every reply, so a compromised worker can at worst send wrong *data*.
"""

import json
import os
import sys
import types

REQUEST_FD = 3
RESPONSE_FD = 4
_HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    config = json.loads(sys.argv[1])
    _arrange_fds()
    try:
        safe_builtins, capped = _start(config)
    except BaseException as error:  # noqa: BLE001 - the parent must learn why, whatever it was
        _send({"op": "failed", "message": f"{type(error).__name__}: {error}"[:2000]})
        os._exit(1)
    _serve(safe_builtins, capped, int(config["max_return_bytes"]))


def _start(config: dict):
    """Everything before the first request: imports, confinement, limits. Returns (builtins, stdout)."""
    import _thread
    import resource
    import time

    modules = _preload(config["allowed_modules"])
    confinement = _load_sibling("confinement")
    seccomp_filter = _load_sibling("seccomp_filter")
    unavailable = {}
    allow_list = None
    try:  # built now, while the library can still be loaded from disk; installed last
        allow_list = seccomp_filter.AllowListFilter(REQUEST_FD, RESPONSE_FD, tuple(config["libseccomp"]))
    except OSError as error:
        unavailable["seccomp"] = str(error)
    protections = confinement.isolate(uid=config["uid"], namespaces=bool(config["namespaces"]), mountpoint=_HERE,
                                      fallback_root=config["fallback_root"])
    unavailable.update(protections.pop("unavailable"))
    confinement.set_no_new_privs()
    protections["no_new_privs"] = True
    try:
        protections["landlock"] = confinement.restrict_with_landlock()
    except OSError as error:
        protections["landlock"] = 0
        unavailable["landlock"] = str(error)
    # The watchdog starts before threads are forbidden and before seccomp, which then covers it too (TSYNC).
    # Wait until it runs: the C library's thread start-up (rseq registration) must not meet the filter.
    started = _thread.allocate_lock()
    started.acquire()
    _thread.start_new_thread(_watch_parent, (os.getppid(), time.sleep, started))
    started.acquire()
    _limit(resource, config)
    protections["open_fds"] = confinement.open_fds()
    protections["seccomp"] = False
    if allow_list is not None:
        try:
            allow_list.install()
            protections["seccomp"] = True
        except OSError as error:
            unavailable["seccomp"] = str(error)
    protections["unavailable"] = unavailable
    capped = _CappedText(int(config["max_stdout_chars"]))
    sys.stdout = sys.stderr = capped
    safe_builtins = _safe_builtins(modules)
    _send({"op": "ready", "protections": protections, "pid": os.getpid()})
    return safe_builtins, capped


def _load_sibling(name: str):
    """Imports a module of this directory by path (isolated mode does not put the script's directory on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_sandbox_{name}", os.path.join(_HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _preload(names: list) -> dict:
    modules = {}
    for name in sorted(names, key=lambda n: n.count(".")):
        try:
            __import__(name)
            modules[name] = sys.modules[name]
        except ImportError:
            continue
    return modules


def _arrange_fds() -> None:
    os.dup2(0, 100)
    os.dup2(1, 101)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.dup2(100, REQUEST_FD)
    os.dup2(101, RESPONSE_FD)
    # Everything else goes (close_range(2)), so the no-new-fds limit below leaves exactly fds 0-4.
    os.closerange(RESPONSE_FD + 1, 2**31 - 1)


def _limit(resource, config: dict) -> None:
    cpu = int(config["cpu_seconds"])
    limits = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        (resource.RLIMIT_AS, (int(config["memory_bytes"]),) * 2),
        (resource.RLIMIT_FSIZE, (0, 0)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_NPROC, (0, 0)),
        (resource.RLIMIT_NOFILE, (RESPONSE_FD + 1, RESPONSE_FD + 1)),
    ]
    for kind, value in limits:
        resource.setrlimit(kind, value)


def _watch_parent(parent: int, sleep, started) -> None:
    started.release()
    while True:
        sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


class _CappedText:
    """Stands in for stdout/stderr: keeps the first ``limit`` characters, counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list = []
        self.size = 0
        self.dropped = 0

    def write(self, text) -> int:
        text = str(text)
        room = self.limit - self.size
        if room > 0:
            self.parts.append(text[:room])
            self.size += min(room, len(text))
        self.dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def flush(self) -> None:
        pass

    def take(self) -> str:
        out = "".join(self.parts)
        if self.dropped:
            out += f"\n[... {self.dropped} more characters of output dropped]"
        self.parts, self.size, self.dropped = [], 0, 0
        return out


_SAFE_BUILTIN_NAMES = (
    "abs", "all", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr", "classmethod",
    "complex", "dict", "dir", "divmod", "enumerate", "filter", "float", "format", "frozenset", "hash", "hex",
    "id", "int", "isinstance", "issubclass", "iter", "len", "list", "map", "max", "min", "next", "object",
    "oct", "ord", "pow", "print", "property", "range", "repr", "reversed", "round", "set", "slice", "sorted",
    "staticmethod", "str", "sum", "super", "tuple", "type", "zip", "True", "False", "None", "NotImplemented",
    "Ellipsis", "__build_class__",
)


def _safe_builtins(modules: dict) -> dict:
    import builtins

    safe = {name: getattr(builtins, name) for name in _SAFE_BUILTIN_NAMES}
    for name, value in vars(builtins).items():
        if isinstance(value, type) and issubclass(value, BaseException):
            safe[name] = value
    proxies = {name: _proxy(name, module, modules) for name, module in modules.items()}

    def restricted_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level or name not in proxies or name.split(".")[0] not in proxies:
            raise ImportError(f"import of {name!r} is not allowed in the sandbox")
        return proxies[name] if fromlist else proxies[name.split(".")[0]]

    def checked(name):
        if not isinstance(name, str) or name.startswith("_"):
            raise AttributeError(f"attribute {name!r} is not accessible in the sandbox")
        return name

    safe["__import__"] = restricted_import
    safe["getattr"] = lambda obj, name, *default: getattr(obj, checked(name), *default)
    safe["setattr"] = lambda obj, name, value: setattr(obj, checked(name), value)
    safe["delattr"] = lambda obj, name: delattr(obj, checked(name))
    safe["hasattr"] = lambda obj, name: hasattr(obj, checked(name))
    return safe


def _proxy(name: str, module, modules: dict):
    """A stand-in module with only the public, non-module attributes (``random._os`` is not reachable)."""
    proxy = types.ModuleType(name)
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        if isinstance(value, types.ModuleType):
            if f"{name}.{key}" not in modules:
                continue
            value = _proxy(f"{name}.{key}", value, modules)
        setattr(proxy, key, value)
    return proxy


def _read_exact(n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(REQUEST_FD, n - len(data))
        if not chunk:
            os._exit(0)  # the parent closed the pipe: we are done
        data += chunk
    return data


def _send(message: dict) -> None:
    body = json.dumps(message).encode()
    data = len(body).to_bytes(4, "big") + body
    while data:
        data = data[os.write(RESPONSE_FD, data):]


def _serve(safe_builtins: dict, capped: _CappedText, max_return_bytes: int) -> None:
    function = None
    while True:
        size = int.from_bytes(_read_exact(4), "big")
        request = json.loads(_read_exact(size))
        if request["op"] == "load":
            function, reply = _load(request, safe_builtins)
        elif request["op"] == "call":
            reply = _call(function, request)
        else:
            reply = {"status": "error", "message": f"unknown op {request['op']!r}"}
        reply["stdout"] = capped.take()
        reply["id"] = request["id"]
        _send_reply(reply, max_return_bytes)


def _load(request: dict, safe_builtins: dict):
    namespace = {"__builtins__": safe_builtins, "__name__": "sandboxed"}
    try:
        exec(compile(request["code"], "<sandboxed>", "exec"), namespace)  # noqa: S102 - the point
    except BaseException as error:  # noqa: BLE001 - report everything, including SystemExit
        return None, _failure(error)
    function = namespace.get(request["name"])
    if not callable(function):
        return None, {"status": "error", "message": f"the code defines no function named {request['name']!r}"}
    return function, {"status": "ok"}


def _call(function, request: dict) -> dict:
    if function is None:
        return {"status": "error", "message": "no function loaded"}
    try:
        value = function(*request["args"], **request["kwargs"])
    except BaseException as error:  # noqa: BLE001
        return _failure(error)
    return {"status": "ok", "value": value}


def _failure(error: BaseException) -> dict:
    status = "memory" if isinstance(error, MemoryError) else "error"
    try:
        text = f"{type(error).__name__}: {error}"[:2000]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        text = type(error).__name__
    line = None
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<sandboxed>":
            line = tb.tb_lineno
        tb = tb.tb_next
    error.__traceback__ = None
    return {"status": status, "message": f"line {line}: {text}" if line else text}


def _send_reply(reply: dict, max_return_bytes: int) -> None:
    try:
        body = json.dumps(reply)
    except MemoryError:
        reply = {"status": "memory", "message": "out of memory encoding the return value", "id": reply["id"]}
        body = json.dumps(reply)
    except (TypeError, ValueError, RecursionError) as error:
        kind = type(reply.get("value")).__name__
        reply = {"status": "error", "id": reply["id"], "stdout": reply.get("stdout", ""),
                 "message": f"return value of type {kind} is not plain data ({type(error).__name__}: {error})"}
        body = json.dumps(reply)
    if len(body) > max_return_bytes:
        reply = {"status": "error", "id": reply["id"], "stdout": reply.get("stdout", "")[:1000],
                 "message": f"return value too large ({len(body)} bytes > {max_return_bytes})"}
        body = json.dumps(reply)
    encoded = body.encode()
    data = len(encoded).to_bytes(4, "big") + encoded
    while data:
        data = data[os.write(RESPONSE_FD, data):]


if __name__ == "__main__":
    main()
