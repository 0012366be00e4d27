"""The sandbox: static screen, hostile code through the full sandbox, and the process limits on their own."""

from __future__ import annotations

import gc
import os
import tempfile
import time

import psutil
import pytest

from rlcore.envs.sandbox import (SandboxLimits, WorkerPool, check_python_modules, create_locked_down_function,
                                 sandbox_protections)

FAST = SandboxLimits(timeout=1.0, load_timeout=2.0, cpu_seconds=5, memory_bytes=256 * 1024 * 1024,
                     max_stdout_chars=1000, max_return_bytes=100_000)
MARKER = "/tmp/rlcore_sandbox_pwned"


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def contained(tmp_path, monkeypatch):
    """Runs the test in an empty cwd with a private temp dir; afterwards asserts that no child process,
    no file (in cwd, the temp dir or the marker path) and no file descriptor was left behind."""
    sandbox_tmp = tmp_path / "tmp"
    sandbox_tmp.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(sandbox_tmp))
    children, fds = _children(), _open_fds()
    yield
    gc.collect()
    deadline = time.monotonic() + 5
    while _children() - children and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _children() - children == set(), "worker processes were left running"
    assert os.listdir(sandbox_tmp) == [], "files left in the temp dir"
    assert os.listdir(cwd) == [], "files left in the working directory"
    assert not os.path.exists(MARKER)
    assert _open_fds() <= fds, "file descriptors leaked"


# ---------------------------------------------------------------------------------------------- static check

def test_check_allows_plain_strategy_and_lists_modules():
    ok, info = check_python_modules(
        "import math\nfrom collections import deque\nimport collections.abc\n"
        "def strategy(board):\n    return 'W' if math.pi > 3 else 'A'\n")
    assert ok, info
    assert info["modules"] == ["collections", "math"]
    assert info["forbidden_modules"] == [] and info["violations"] == [] and info["error"] is None


@pytest.mark.parametrize("code, reason", [
    ("import os", "'os' is forbidden"),
    ("import numpy", "'numpy' is not allowed"),
    ("from subprocess import run", "'subprocess' is forbidden"),
    ("import os.path", "'os.path' is forbidden"),
    ("from . import x", "relative imports"),
    ("x = ().__class__", "'__class__'"),
    ("x = eval('1')", "'eval'"),
    ("exec('1')", "'exec'"),
    ("compile('1', 'f', 'exec')", "'compile'"),
    ("open('f')", "'open'"),
    ("__import__('os')", "'__import__'"),
    ("x = __builtins__", "'__builtins__'"),
    ("getattr(1, 'real' + 'x')", "computed attribute name"),
    ("getattr(1, '__class__')", "'__class__'"),
    ("import random\nrandom._os", "'_os'"),
    ("import typing\ntyping.sys", "'sys'"),
    ("g = (i for i in ())\ng.gi_frame", "'gi_frame'"),
    ("'{0.__class__}'.format(1)", "__class__"),
    ("globals()", "'globals'"),
    ("from math import *", "import *"),
])
def test_check_rejects_escape_routes(code, reason):
    ok, info = check_python_modules(code)
    assert not ok
    assert any(reason in v for v in info["violations"]), info["violations"]


def test_check_reports_forbidden_modules_and_syntax_errors():
    ok, info = check_python_modules("import os, math\nimport socket\n")
    assert not ok and info["forbidden_modules"] == ["os", "socket"] and info["modules"] == ["math", "os", "socket"]
    ok, info = check_python_modules("def strategy(:\n")
    assert not ok and info["error"].startswith("SyntaxError")
    with pytest.raises(TypeError, match="code must be a str"):
        check_python_modules(None)


def test_limits_name_the_bad_field():
    with pytest.raises(ValueError, match="SandboxLimits.timeout"):
        SandboxLimits(timeout=0)
    with pytest.raises(ValueError, match="SandboxLimits.memory_bytes"):
        SandboxLimits(memory_bytes=10)
    with pytest.raises(ValueError, match="WorkerPool.max_workers"):
        WorkerPool(max_workers=0)


# ---------------------------------------------------------------------------------------------- full sandbox

def test_function_runs_and_answers_many_calls_in_one_worker(contained):
    code = "import math\ndef strategy(board):\n    print('seen', len(board))\n    return ['W', math.floor(2.5)]\n"
    with create_locked_down_function(code, limits=FAST) as function:
        first = function([[0, 2], [2, 0]])
        assert first.status == "ok" and first.value == ["W", 2] and first.stdout == "seen 2\n"
        pid = function.pid
        for _ in range(200):
            assert function([[0]]).value == ["W", 2]
        assert function.pid == pid  # the same worker answered every call


def test_worker_is_replaced_after_a_timeout(contained):
    code = "def strategy(n):\n    while n:\n        pass\n    return 'ok'\n"
    with create_locked_down_function(code, limits=FAST) as function:
        assert function(0).value == "ok"
        first_pid = function.pid
        assert function(1).status == "timeout"
        assert function(0).value == "ok"
        assert function.pid != first_pid


# name, code, expected status. Every snippet defines strategy(board); the static check is on.
HOSTILE = [
    ("infinite loop", "def strategy(board):\n    while True:\n        pass\n", "timeout"),
    ("infinite loop at load", "while True:\n    pass\ndef strategy(board):\n    return 'W'\n", "timeout"),
    ("memory bomb", "def strategy(board):\n    x = []\n    while True:\n        x.append(' ' * 10**7)\n", "memory"),
    ("memory bomb one shot", "def strategy(board):\n    return len('x' * 10**10)\n", "memory"),
    ("recursion bomb", "def strategy(board):\n    return strategy(board)\n", "error"),
    ("fork bomb", "import os\ndef strategy(board):\n    while True:\n        os.fork()\n", "forbidden"),
    ("subprocess", "import subprocess\ndef strategy(board):\n    subprocess.run(['ls'])\n", "forbidden"),
    ("file write", "def strategy(board):\n    open('pwned.txt', 'w').write('x')\n", "forbidden"),
    ("read passwd", "def strategy(board):\n    return open('/etc/passwd').read()\n", "forbidden"),
    ("socket", "import socket\ndef strategy(board):\n    socket.create_connection(('1.1.1.1', 80))\n", "forbidden"),
    ("subclass walk", "def strategy(board):\n    return str(().__class__.__base__.__subclasses__())\n", "forbidden"),
    ("builtins dict", "def strategy(board):\n    return __builtins__['__import__']('os').getcwd()\n", "forbidden"),
    ("dunder import", "def strategy(board):\n    return __import__('os').getcwd()\n", "forbidden"),
    ("sys.exit", "import sys\ndef strategy(board):\n    sys.exit(0)\n", "forbidden"),
    ("os._exit", "import os\ndef strategy(board):\n    os._exit(0)\n", "forbidden"),
    ("signal handler", "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                       "def strategy(board):\n    return 'W'\n", "forbidden"),
    ("threads", "import threading\ndef strategy(board):\n    threading.Thread(target=print).start()\n",
     "forbidden"),
    ("ctypes", "import ctypes\ndef strategy(board):\n    ctypes.string_at(0)\n", "forbidden"),
    ("gc", "import gc\ndef strategy(board):\n    return len(gc.get_objects())\n", "forbidden"),
    ("frames", "def strategy(board):\n    g = (x for x in [1])\n    return str(g.gi_frame.f_back)\n",
     "forbidden"),
    ("exec", "def strategy(board):\n    exec('import os')\n", "forbidden"),
    ("eval", "def strategy(board):\n    return eval('1+1')\n", "forbidden"),
    ("computed getattr", "def strategy(board):\n    return str(getattr(board, '__cl' + 'ass__'))\n", "forbidden"),
    ("private module reference", "import random\ndef strategy(board):\n    return random._os.getcwd()\n",
     "forbidden"),
    ("importlib", "import importlib\ndef strategy(board):\n    importlib.import_module('os')\n", "forbidden"),
    ("format string walk", "def strategy(board):\n    return '{0.__class__.__mro__}'.format(board)\n",
     "forbidden"),
    ("globals", "def strategy(board):\n    return str(globals())\n", "forbidden"),
    ("raise SystemExit", "def strategy(board):\n    raise SystemExit(3)\n", "error"),
    ("raise KeyboardInterrupt", "def strategy(board):\n    raise KeyboardInterrupt\n", "error"),
    ("hostile __str__", "class E(Exception):\n    def __str__(self):\n        while True:\n            pass\n"
                        "def strategy(board):\n    raise E()\n", "timeout"),
    ("huge return", "def strategy(board):\n    return 'x' * 10**7\n", "error"),
    ("not plain data", "def strategy(board):\n    return object()\n", "error"),
    ("syntax error", "def strategy(board:\n    return 'W'\n", "error"),
    ("no function", "x = 1\n", "error"),
    ("safe getattr private", "def strategy(board):\n    return getattr(board, 'append') and 1\n", "ok"),
]


@pytest.mark.parametrize("name, code, expected", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_code_gets_the_right_status(contained, name, code, expected):
    assert len(HOSTILE) >= 25
    start = time.monotonic()
    with create_locked_down_function(code, limits=FAST) as function:
        result = function([[2, 0], [0, 2]])
    assert result.status == expected, (result.status, result.message)
    assert time.monotonic() - start < 8
    if expected == "forbidden":
        assert result.message.startswith("line "), result.message


def test_huge_output_is_truncated(contained):
    code = "def strategy(board):\n    for i in range(10**5):\n        print('spam' * 100)\n    return 'W'\n"
    with create_locked_down_function(code, limits=FAST) as function:
        result = function([[0]])
    assert result.status == "ok" and result.value == "W"
    assert len(result.stdout) < FAST.max_stdout_chars + 100 and "characters of output dropped" in result.stdout


def test_board_argument_is_a_copy(contained):
    code = "def strategy(board):\n    board[0][0] = 2048\n    board.append([1])\n    return board\n"
    board = [[2, 0], [0, 2]]
    with create_locked_down_function(code, limits=FAST) as function:
        result = function(board)
    assert result.value == [[2048, 0], [0, 2], [1]]
    assert board == [[2, 0], [0, 2]]


def test_restricted_import_only_offers_public_parts_of_allowed_modules(contained):
    # With the static check off, the import machinery still only hands out allow-listed stand-ins.
    code = ("import random, collections.abc\n"
            "def strategy(board):\n"
            "    out = [hasattr(random, 'choice'), 'Mapping' in dir(collections.abc)]\n"
            "    try:\n        import os\n    except ImportError:\n        out.append('no os')\n"
            "    out.append('_os' in dir(random))\n"
            "    return out\n")
    with create_locked_down_function(code, limits=FAST, check=False) as function:
        assert function(None).value == [True, True, "no os", False]


# ---------------------------------------------------------------------------------------------- process level
# The static check is bypassed (check=False) and the code escapes the restricted builtins by walking
# object.__subclasses__() to os' globals: only the worker's process limits stand in the way.

ESCAPE = '''
def _os():
    for cls in ().__class__.__base__.__subclasses__():
        if cls.__name__ == "_wrap_close":
            return cls.__init__.__globals__
    raise RuntimeError("no escape route")

def _real_builtins():
    return _os()["__builtins__"]
'''

PROCESS_LEVEL = [
    ("escape works (control)", "return _os()['getpid']() > 0", "ok"),
    ("fork", "return _os()['fork']()", "error"),
    ("fork bomb", "while True:\n        _os()['fork']()", "error"),
    ("posix_spawn", "return _os()['posix_spawn']('/bin/sh', ['sh', '-c', 'touch " + MARKER + "'], {})", "error"),
    ("thread", "t = _real_builtins()['__import__']('_thread')\n    return t.start_new_thread(print, ())", "error"),
    ("read passwd", "return _real_builtins()['open']('/etc/passwd').read()", "error"),
    ("write a file in cwd", "return _real_builtins()['open']('pwned.txt', 'w').write('x')", "error"),
    ("write the marker file", "return _real_builtins()['open']('" + MARKER + "', 'w').write('x')", "error"),
    ("socket", "s = _real_builtins()['__import__']('socket')\n    return str(s.socket())", "error"),
    # ctypes is loaded in the worker (it confined itself with it) but reaches nothing: the C calls fail too.
    ("ctypes", ("c = _real_builtins()['__import__']('ctypes')\n    libc = c.CDLL(None)\n"
                "    return [libc.open(b'/etc/passwd', 0), libc.kill(_os()['getppid'](), 10), libc.fork()]"), "ok"),
    ("pipe", "return _os()['pipe']()", "error"),
    ("raise NPROC limit", "r = _os()['sys'].modules['resource']\n    r.setrlimit(r.RLIMIT_NPROC, (99, 99))",
     "error"),
    ("os._exit", "_os()['_exit'](0)", "error"),
    ("sys.exit", "_os()['sys'].exit(0)", "error"),
    ("memory bomb", "x = []\n    while True:\n        x.append(bytearray(10**7))", "memory"),
    ("write to fd 1", "_os()['write'](1, b'x' * 10**6)\n    return 'W'", "error"),  # only the reply pipe
]


@pytest.mark.parametrize("name, body, expected", PROCESS_LEVEL, ids=[p[0] for p in PROCESS_LEVEL])
def test_process_limits_hold_without_the_static_check(contained, name, body, expected):
    code = ESCAPE + "\ndef strategy(board):\n    " + body + "\n"
    assert not check_python_modules(code)[0]  # the screen would have stopped it
    with create_locked_down_function(code, limits=FAST, check=False) as function:
        result = function([[0]])
    assert result.status == expected, (result.status, result.message)
    if name == "escape works (control)":
        assert result.value is True
    if name == "ctypes":
        assert result.value == [-1, -1, -1]
    if expected == "error" and name not in ("os._exit", "sys.exit"):
        assert "Error" in result.message, result.message


def test_cpu_limit_holds_even_when_the_code_ignores_sigxcpu(contained):
    # Wall-clock timeout far away: only RLIMIT_CPU (SIGXCPU, then SIGKILL at the hard limit) stops it.
    limits = SandboxLimits(timeout=30.0, cpu_seconds=1)
    body = ("s = _os()['sys'].modules.get('_signal') or _real_builtins()['__import__']('_signal')\n"
            "    s.signal(24, s.SIG_IGN)\n    while True:\n        pass")
    start = time.monotonic()
    with create_locked_down_function(ESCAPE + "\ndef strategy(board):\n    " + body + "\n", limits=limits,
                                     check=False) as function:
        result = function([[0]])
    assert result.status == "timeout" and "CPU time limit" in result.message, result
    assert time.monotonic() - start < 10


def test_root_workers_are_jailed_and_cannot_signal_the_parent(contained):
    protections = sandbox_protections(FAST)
    if os.geteuid() != 0:
        pytest.skip("chroot and uid switch need root; the remaining limits are tested above")
    assert protections["chroot"] and protections["privileges_dropped"] and protections["uid"] != 0
    body = "g = _os()\n    return g['kill'](g['getppid'](), 9)"
    with create_locked_down_function(ESCAPE + "\ndef strategy(board):\n    " + body + "\n", limits=FAST,
                                     check=False) as function:
        result = function(None)
    assert result.status == "error" and "PermissionError" in result.message
    listing = "return _os()['listdir']('/')"
    with create_locked_down_function(ESCAPE + "\ndef strategy(board):\n    " + listing + "\n",
                                     limits=FAST, check=False) as function:
        result = function(None)
    assert result.status == "error"  # no fds to open a directory with, and nothing to see in the jail


def test_pool_reuses_warm_workers_and_leaves_nothing(contained):
    with WorkerPool(max_workers=2, limits=FAST) as pool:
        pool.warm_up()
        codes = [f"def strategy(board):\n    return {i}\n" for i in range(6)]

        def run(code):
            with pool.function(code) as function:
                return function(None).value

        assert pool.map(run, codes) == list(range(6))
