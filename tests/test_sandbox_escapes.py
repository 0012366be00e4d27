"""The sandbox holds when untrusted code reaches the worker's real ``os`` module, as root and as an unprivileged
user, with the static check off; the parent survives hostile replies, fd exhaustion and its own kill -9.

Each escape class below really reaches ``os`` (the tests check that the pid it reports is the worker's); what
stops it is the kernel: seccomp, namespaces, Landlock and rlimits. The parent side runs in a separate process
(``_RUNNER``) as the user under test, so that "same uid as the trainer" is the situation tested when not root.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from rlcore.envs import confinement, sandbox, seccomp_filter
from rlcore.envs.sandbox import (SandboxLimits, SandboxUnavailableError, WorkerPool, create_locked_down_function,
                                 sandbox_protections)

FAST = SandboxLimits(timeout=2.0, load_timeout=5.0, cpu_seconds=5, memory_bytes=256 * 1024 * 1024,
                     max_stdout_chars=1000, max_return_bytes=100_000)
ENVS_DIR = os.path.dirname(os.path.abspath(sandbox.__file__))
NOBODY = 65534

# Each defines _escape() -> the worker's real os module, by a route the issue found past the static check.
ESCAPES = {
    "generator frame via attrgetter": '''
import operator
def _escape():
    box = []
    def walk():
        frame = operator.attrgetter("gi_frame")(box[0])
        while frame is not None:
            found = operator.attrgetter("f_globals")(frame).get("os")
            if found is not None:
                yield found
                return
            frame = operator.attrgetter("f_back")(frame)
    box.append(walk())
    return next(box[0])
''',
    "traceback frames": '''
import operator
def _escape():
    try:
        raise ValueError("x")
    except ValueError as error:
        frame = operator.attrgetter("__traceback__.tb_frame")(error)
    while frame is not None:
        found = operator.attrgetter("f_globals")(frame).get("os")
        if found is not None:
            return found
        frame = operator.attrgetter("f_back")(frame)
''',
    "string.Formatter().get_field": '''
import string
def _escape():
    field = string.Formatter().get_field
    box = []
    def walk():
        frame = field("0.gi_frame", (box[0],), {})[0]
        while frame is not None:
            found = field("0.f_globals", (frame,), {})[0].get("os")
            if found is not None:
                yield found
                return
            frame = field("0.f_back", (frame,), {})[0]
    box.append(walk())
    return next(box[0])
''',
    "operator.methodcaller": '''
import operator
def _escape():
    for cls in operator.methodcaller("__subclasses__")(object):
        if operator.attrgetter("__name__")(cls) == "_wrap_close":
            return operator.attrgetter("__init__.__globals__")(cls)["sys"].modules["os"]
''',
    "typing.get_type_hints": '''
import operator, typing
def _escape():
    box = []
    def annotated(x):
        pass
    operator.attrgetter("__annotations__")(annotated)["x"] = "box.append(__imp" + "ort__('os')) or int"
    typing.get_type_hints(annotated, globalns={}, localns={"box": box})
    return box[0]
''',
}

# With the real os in hand, try everything the issue saw succeed as non-root. Each attempt records
# "DONE: ..." or "blocked: ..."; the last one tries to kill the parent outright.
ATTACKS = '''
def strategy(target):
    os = _escape()
    sys = os.sys
    builtins = sys.modules["builtins"]
    parent = os.getppid()
    out = {"pid": os.getpid()}

    def attempt(name, action):
        try:
            out[name] = "DONE: " + repr(action())[:300]
        except BaseException as error:
            out[name] = "blocked: " + type(error).__name__ + ": " + str(error)[:200]

    def checked(result):  # C calls through ctypes report failure as -1
        if result == -1:
            raise OSError("the C call returned -1")
        return result

    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        return pid

    attempt("read the secret", lambda: builtins.open(target["secret"]).read())
    attempt("read the secret with os.open", lambda: os.read(os.open(target["secret"], os.O_RDONLY), 100))
    attempt("truncate the victim", lambda: builtins.open(target["victim"], "w").close())
    attempt("unlink the victim", lambda: os.unlink(target["victim"]))
    attempt("create a file", lambda: builtins.open(target["dir"] + "/pwned", "x").close())
    attempt("make a directory", lambda: os.mkdir(target["dir"] + "/pwned-dir"))
    attempt("list the root", lambda: os.listdir("/"))
    attempt("read /etc/passwd", lambda: builtins.open("/etc/passwd").read())
    attempt("read the parent's environment", lambda: builtins.open("/proc/%d/environ" % parent, "rb").read())
    attempt("close fd 0 then open", lambda: (os.close(0), os.open("/etc/hostname", os.O_RDONLY)))
    attempt("signal the parent", lambda: os.kill(parent, 10))
    attempt("signal every process", lambda: os.kill(-1, 10))
    attempt("signal the parent's group", lambda: os.killpg(os.getpgid(parent), 10))
    attempt("import socket", lambda: builtins.__import__("socket").create_connection(("127.0.0.1", target["port"]), 1))
    attempt("fork", fork)
    attempt("spawn a shell", lambda: os.posix_spawn("/bin/sh", ["sh", "-c", "touch " + target["dir"] + "/spawned"], {}))
    attempt("raise the process limit", lambda: sys.modules["resource"].setrlimit(6, (99, 99)))
    ctypes = sys.modules.get("ctypes")
    attempt("ctypes: load a library from a file", lambda: ctypes.CDLL(target["secret"]))
    libc = ctypes.CDLL(None, use_errno=True)
    path = target["secret"].encode()
    attempt("ctypes: open the secret", lambda: checked(libc.open(path, 0)))
    attempt("ctypes: signal the parent", lambda: checked(libc.kill(parent, 10)))
    attempt("ctypes: ptrace the parent", lambda: checked(libc.ptrace(16, parent, 0, 0)))
    attempt("ctypes: socket", lambda: checked(libc.socket(2, 1, 0)))
    attempt("ctypes: unshare", lambda: checked(libc.unshare(0x10000000)))
    attempt("ctypes: executable memory", lambda: checked(libc.mprotect(ctypes.c_void_p(0), 0, 7)))
    attempt("kill the parent", lambda: os.kill(parent, 9))
    return out
'''

_RUNNER = r'''
import gc, json, os, signal, sys, time, types
plan = json.loads(sys.argv[1])
package = types.ModuleType("sandbox_under_test")
package.__path__ = [plan["envs"]]
sys.modules["sandbox_under_test"] = package
from sandbox_under_test.sandbox import LockedDownFunction, SandboxLimits

received = []
for number in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(number, lambda signum, frame: received.append(signum))


def children():
    mine = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                mine.append(int(name))
    return mine


limits = SandboxLimits(**plan["limits"])
if plan["mode"] == "hold":
    functions = [LockedDownFunction("def f():\n    return 1\n", "f", limits=limits) for _ in range(plan["workers"])]
    loads = [function.load().status for function in functions]
    print(json.dumps({"loads": loads, "pids": [function.pid for function in functions],
                      "protections": functions[0].protections}), flush=True)
    while True:
        time.sleep(1)

results = []
for case in plan["cases"]:
    entry = {"name": case["name"]}
    try:
        function = LockedDownFunction(case["code"], "strategy", limits=limits, check=False)
        loaded = function.load()
        entry["load"] = loaded.status + " " + loaded.message
        entry["worker_pid"] = function.pid
        entry["protections"] = function.protections
        result = function(case["argument"])
        entry.update(status=result.status, value=result.value, message=result.message, stdout=result.stdout)
        function.close()
    except BaseException as error:
        entry["raised"] = "%s: %s" % (type(error).__name__, error)
    results.append(entry)
gc.collect()
deadline = time.monotonic() + 5
while children() and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.3)  # a signal sent by a worker would have arrived by now
print(json.dumps({"results": results, "signals": received, "children": children(),
                  "tmp": sorted(os.listdir(plan["tmp"]))}))
'''


_AS_NOBODY = {"user": NOBODY, "group": NOBODY, "extra_groups": []}


def _interpreter_for_nobody() -> str | None:
    """A Python that the unprivileged user can run and that can read this checkout, or None."""
    for candidate in dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]):
        if not candidate or not os.path.exists(candidate):
            continue
        probe = f"import ctypes, json, sys; open({os.path.join(ENVS_DIR, 'sandbox.py')!r}).close(); " \
                "assert sys.version_info >= (3, 10)"
        try:
            done = subprocess.run([candidate, "-I", "-c", probe], check=False, cwd="/", env={}, capture_output=True,
                                  timeout=30, **_AS_NOBODY)
        except OSError:
            continue
        if done.returncode == 0:
            return candidate
    return None


class Identity:
    """Who runs the parent side: "current" (root in CI) or "unprivileged" (nobody, reached from root)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.python = sys.executable
        self.switch: dict = {}
        self.uid = os.geteuid()
        if name == "unprivileged":
            if os.geteuid() != 0:
                pytest.skip("already unprivileged: the 'current' identity covers it")
            python = _interpreter_for_nobody()
            if python is None:
                pytest.skip("no Python interpreter and checkout that the user nobody can read")
            self.python, self.switch, self.uid = python, _AS_NOBODY, NOBODY

    def private_dir(self) -> str:
        path = tempfile.mkdtemp(prefix="rlcore-escape-test-", dir="/tmp")
        os.chown(path, self.uid, self.uid)
        os.chmod(path, 0o700)
        return path

    def start(self, plan: dict, tmp: str, marker: str) -> subprocess.Popen:
        plan = dict(plan, envs=ENVS_DIR, tmp=tmp)
        return subprocess.Popen([self.python, "-I", "-c", _RUNNER, json.dumps(plan)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd="/",
                                env={"TMPDIR": tmp, "HF_TOKEN": marker, "PATH": "/usr/bin:/bin"}, **self.switch)


@pytest.fixture(params=["current", "unprivileged"])
def identity(request) -> Identity:
    return Identity(request.param)


@pytest.fixture
def world(identity):
    """A secret and a victim file owned by the identity, a listening TCP socket and the identity's TMPDIR."""
    directory, tmp = identity.private_dir(), identity.private_dir()
    secret, victim = os.path.join(directory, "secret.txt"), os.path.join(directory, "victim.txt")
    secret_text, victim_text = "secret-" + secrets.token_hex(8), "victim-" + secrets.token_hex(8)
    for path, text in ((secret, secret_text), (victim, victim_text)):
        with open(path, "w") as handle:
            handle.write(text)
        os.chown(path, identity.uid, identity.uid)
        os.chmod(path, 0o600)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    yield {"dir": directory, "tmp": tmp, "secret": secret, "victim": victim, "secret_text": secret_text,
           "victim_text": victim_text, "listener": listener, "marker": "hf_" + secrets.token_hex(12)}
    listener.close()
    shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _run(identity: Identity, plan: dict, world: dict, timeout: float = 120) -> dict:
    process = identity.start(plan, world["tmp"], world["marker"])
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"the parent process died (exit {process.returncode}): {err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def test_escapes_reach_os_but_nothing_outside_the_worker(identity, world):
    target = {key: world[key] for key in ("dir", "secret", "victim")}
    target["port"] = world["listener"].getsockname()[1]
    cases = [{"name": name, "code": code + ATTACKS, "argument": target} for name, code in ESCAPES.items()]
    report = _run(identity, {"mode": "cases", "cases": cases, "limits": {}}, world)

    for entry in report["results"]:
        name = entry["name"]
        assert "raised" not in entry, (name, entry)
        assert entry["load"].startswith("ok"), (name, entry)
        assert entry["status"] == "ok", (name, entry["message"])
        outcome = entry["value"]
        assert outcome.pop("pid") == entry["worker_pid"], f"{name}: the escape did not reach the worker's os"
        assert len(outcome) == ATTACKS.count("attempt(\""), outcome
        done = {attack: text for attack, text in outcome.items() if not text.startswith("blocked")}
        assert done == {}, f"{name} as {identity.name}: {done}"
        layers = entry["protections"]
        assert layers["seccomp"] is True and layers["no_new_privs"] is True and layers["open_fds"] == [0, 1, 2, 3, 4]
        assert layers["uid"] != 0 and layers["privileges_dropped"] and layers["capabilities"] == 0, layers

    text = json.dumps(report)
    assert world["secret_text"] not in text and world["marker"] not in text and "root:x:0:0" not in text
    with open(world["victim"]) as handle:
        assert handle.read() == world["victim_text"]
    assert sorted(os.listdir(world["dir"])) == ["secret.txt", "victim.txt"]
    with pytest.raises(BlockingIOError):
        world["listener"].accept()
    assert report["signals"] == [], "a worker signalled the parent"
    assert report["children"] == [], "worker processes were left running"
    assert report["tmp"] == [], "files left in the parent's temp dir"
    assert os.listdir(world["tmp"]) == []


def test_workers_exit_and_leave_nothing_after_the_parent_is_killed(identity, world):
    process = identity.start({"mode": "hold", "workers": 2, "limits": {}}, world["tmp"], world["marker"])
    line = process.stdout.readline()
    assert line, process.stderr.read()[-3000:]
    held = json.loads(line)
    assert held["loads"] == ["ok", "ok"] and all(held["pids"])
    assert os.listdir(world["tmp"]) == []  # with namespaces the empty root needs no directory of ours
    process.kill()
    process.wait(timeout=10)
    _assert_gone(held["pids"])
    assert os.listdir(world["tmp"]) == []


def _assert_gone(pids: list[int], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    alive = pids
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"workers {alive} outlived their parent")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="the chroot directory fallback is used only by root workers")
def test_chroot_dirs_of_a_killed_parent_are_removed_by_the_next_start(tmp_path):
    """As root without namespaces the worker chroots into a directory; kill -9 of the parent leaves it, and the
    next worker start (any process of the same user) removes it."""
    world = {"tmp": str(tmp_path)}
    process = Identity("current").start({"mode": "hold", "workers": 2, "limits": {"namespaces": False}},
                                        world["tmp"], "marker")
    line = process.stdout.readline()
    assert line, process.stderr.read()[-3000:]
    held = json.loads(line)
    assert held["protections"]["chroot"] is True and held["protections"]["network_namespace"] is False
    base = os.path.join(world["tmp"], "rlcore-sandbox-0")
    assert len(os.listdir(base)) == 2
    process.kill()
    process.wait(timeout=10)
    _assert_gone(held["pids"])
    assert len(os.listdir(base)) == 2  # nobody could clean up

    previous = tempfile.tempdir
    tempfile.tempdir = world["tmp"]
    try:
        with create_locked_down_function("def f():\n    return 1\n", "f",
                                         limits=SandboxLimits(namespaces=False)) as function:
            assert function().value == 1
            assert os.listdir(base) == [os.path.basename(function._worker.fallback_root)]
    finally:
        tempfile.tempdir = previous
    assert os.listdir(world["tmp"]) == []


# ---------------------------------------------------------------------------------------------- hostile replies
# The escaped code writes its own message on the response pipe (fd 4) and then spins; the parent must turn
# it into status "error" with the reason, never raise.

def _reply(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


HOSTILE_REPLIES = [
    ("deep nesting", _reply(b"[" * 50_000 + b"]" * 50_000), "nested deeper"),
    ("nesting within the recursion limit", _reply(b'{"id": 2, "status": "ok", "value": ' + b"[" * 500 + b"]" * 500
                                                  + b"}"), "nested deeper"),
    ("huge integer", _reply(b'{"id": 2, "status": "ok", "value": ' + b"9" * 50_000 + b"}"), "not valid JSON"),
    ("not an object", _reply(b"[1, 2, 3]"), "not an object"),
    ("wrong id", _reply(b'{"id": 999, "status": "ok", "value": 1}'), "does not match"),
    ("boolean id", _reply(b'{"id": true, "status": "ok", "value": 1}'), "does not match"),
    ("unknown status", _reply(b'{"id": 2, "status": "owned", "value": 1}'), "unknown status"),
    ("message not a string", _reply(b'{"id": 2, "status": "error", "message": {"a": [1]}}'), "not a string"),
    ("garbage bytes", _reply(b"\xff\xfe\x00garbage\x80"), "not valid JSON"),
    ("absurd length", (2**32 - 1).to_bytes(4, "big"), "more than max_return_bytes"),
    ("closed mid-message", (1000).to_bytes(4, "big") + b'{"id": 2', "middle of a reply"),
]


@pytest.mark.parametrize("name, data, reason", HOSTILE_REPLIES, ids=[h[0] for h in HOSTILE_REPLIES])
def test_hostile_replies_become_an_error_status(name, data, reason):
    then = "os._exit(0)" if name == "closed mid-message" else "while True:\n        pass"
    code = (ESCAPES["traceback frames"] + f"\ndef strategy(board):\n    os = _escape()\n    os.write(4, {data!r})\n"
            f"    {then}\n")
    start = time.monotonic()
    with create_locked_down_function(code, limits=FAST, check=False) as function:
        assert function.load().ok
        pid = function.pid
        result = function([[0]])
        assert result.status == "error" and reason in result.message, (result.status, result.message)
        assert function.pid is None and not _alive(pid)  # the worker that lied was killed
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------------------------------------- fd exhaustion

_LAYER_KEYS = ("seccomp", "landlock", "user_namespace", "network_namespace", "mount_namespace", "chroot",
               "privileges_dropped", "capabilities", "open_fds", "unavailable")


def test_fd_exhaustion_gives_a_status_that_says_why_and_is_not_remembered(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = "def strategy(n):\n    return n + 1\n"
    baseline = {key: sandbox_protections(FAST)[key] for key in _LAYER_KEYS}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    pool = WorkerPool(max_workers=1, limits=FAST, spares=1)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as error:
        assert error.errno == errno.EMFILE
    try:
        plain = create_locked_down_function(code, limits=FAST)
        pooled = pool.function(code)
        results = [plain.load(), plain(1), pooled.load(), pooled(1)]
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for result in results:
        assert result.status == "error" and "no file descriptors left" in result.message, result
    # Nothing of that moment is remembered: the same objects work, with every layer, once fds are back.
    assert plain(1).value == 2 and pooled(1).value == 2
    for function in (plain, pooled):
        assert {key: function.protections[key] for key in _LAYER_KEYS} == baseline
        function.close()
    pool.close()
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- layers

def test_missing_seccomp_fails_closed_and_the_opt_out_warns_at_every_start(monkeypatch, caplog):
    monkeypatch.setattr(seccomp_filter, "LIBRARY_NAMES", ("libseccomp-not-installed.so.2",))
    code = "def strategy():\n    return 7\n"
    with create_locked_down_function(code, limits=FAST) as function:
        with pytest.raises(SandboxUnavailableError, match="'seccomp' is unavailable.*libseccomp-not-installed"
                                                          ".*required_layers=\\(\\)"):
            function.load()
        assert function.pid is None
    with pytest.raises(SandboxUnavailableError, match="seccomp"):
        sandbox_protections(FAST)

    weaker = SandboxLimits(timeout=2.0, load_timeout=5.0, required_layers=())
    caplog.set_level("WARNING", logger="rlcore.envs.sandbox")
    for _ in range(2):
        with create_locked_down_function(code, limits=weaker) as function:
            assert function().value == 7
            assert function.protections["seccomp"] is False
            assert "libseccomp-not-installed" in function.protections["unavailable"]["seccomp"]
    warnings = [r for r in caplog.records if "WITHOUT seccomp" in r.getMessage()]
    assert len(warnings) == 2


def test_without_seccomp_landlock_and_namespaces_still_hold(monkeypatch, tmp_path):
    """Defence in depth: with the wall opted out, the other layers alone still stop file access and signals."""
    try:
        abi = confinement.landlock_abi()
    except OSError as error:
        pytest.skip(f"no Landlock here: {error}")
    monkeypatch.setattr(seccomp_filter, "LIBRARY_NAMES", ("libseccomp-not-installed.so.2",))
    victim = tmp_path / "victim.txt"
    victim.write_text("victim")
    body = ("\ndef strategy(victim):\n    os = _escape()\n    os.close(0)\n    out = {}\n"
            "    actions = {'read': lambda: os.open(victim, os.O_RDONLY), 'unlink': lambda: os.unlink(victim),\n"
            "               'list the root': lambda: os.listdir('/'), 'signal the parent': lambda: os.kill(os.getppid(), 0)}\n"
            "    for name, action in actions.items():\n"
            "        try:\n            out[name] = 'DONE ' + repr(action())\n"
            "        except OSError as error:\n            out[name] = type(error).__name__\n    return out\n")
    limits = SandboxLimits(timeout=2.0, load_timeout=5.0, required_layers=("landlock", "namespaces"))
    with create_locked_down_function(ESCAPES["traceback frames"] + body, limits=limits, check=False) as function:
        result = function(str(victim))
        assert function.protections["landlock"] == abi and function.protections["seccomp"] is False
    assert result.status == "ok", result.message
    # With fd 0 closed to get under RLIMIT_NOFILE (as the attacker did): the file is outside the
    # empty root (not found), and the root itself is unreadable (Landlock).
    assert result.value["read"] == result.value["unlink"] == "FileNotFoundError", result.value
    assert result.value["list the root"] == "PermissionError", result.value
    if abi >= 6 or os.geteuid() == 0:  # Landlock scopes signals from ABI 6; as root the worker has its own uid
        assert result.value["signal the parent"] == "PermissionError", result.value
    assert victim.read_text() == "victim"


def test_required_layers_are_validated_and_all_three_can_be_required():
    with pytest.raises(ValueError, match="SandboxLimits.required_layers"):
        SandboxLimits(required_layers=("seccomp", "selinux"))
    with pytest.raises(ValueError, match="SandboxLimits.required_layers"):
        SandboxLimits(required_layers="seccomp")
    with pytest.raises(ValueError, match="namespaces=False"):
        SandboxLimits(namespaces=False, required_layers=("namespaces",))
    with pytest.raises(ValueError, match="SandboxLimits.namespaces"):
        SandboxLimits(namespaces=1)
    missing = sandbox_protections(FAST)["unavailable"]
    if missing:
        pytest.skip(f"not every layer is available here: {missing}")
    strict = SandboxLimits(required_layers=("namespaces", "landlock", "seccomp"))
    assert strict.required_layers == ("seccomp", "landlock", "namespaces")
    layers = sandbox_protections(strict)
    assert layers["seccomp"] and layers["landlock"] and layers["chroot"] and layers["unavailable"] == {}


def test_the_allow_list_is_what_the_module_says():
    built = seccomp_filter.AllowListFilter(3, 4)
    try:
        assert set(built.allowed) <= set(seccomp_filter.ALLOWED_SYSCALLS)
        for forbidden in ("open", "openat", "socket", "connect", "kill", "tgkill", "ptrace", "execve", "clone",
                          "clone3", "fork", "unshare", "mount", "chroot", "prlimit64", "close", "seccomp", "bpf"):
            assert forbidden not in built.allowed
    finally:
        built.release()
