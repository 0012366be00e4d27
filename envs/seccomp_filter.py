"""The seccomp-bpf allow-list of a sandbox worker, compiled and loaded by libseccomp.

libseccomp (https://github.com/seccomp/libseccomp, LGPL-2.1) is the maintained C library that turns a list of
rules into a BPF program: it knows every architecture's syscall numbers, adds the architecture check (a 32-bit
``int 0x80`` or x32 call does not match the native numbers and kills the process), and orders the comparisons.
No BPF is written by hand here. This module is a minimal ``ctypes`` binding of the five functions we use,
because the worker runs as ``python -I -S`` (standard library only) and libseccomp's own Python binding is not
installable from PyPI. The shared library comes from the operating system: ``libseccomp2`` on Debian and Ubuntu
(installed on almost every system, since systemd and apt depend on it; CI gets it the same way), ``libseccomp``
on Fedora, RHEL and Arch.

Only what the pipe protocol and the Python runtime need after start-up is allowed: reading the request pipe,
writing the response pipe, memory management (never executable), futexes, clocks and sleeping, signal
handling of the process itself, random bytes and exiting. Everything else fails with ``EPERM``, which Python
raises as ``PermissionError``: a forbidden call by untrusted code then gives an ordinary error status with a
message naming what was refused, and the runtime's own optional calls (a lazy import looking for a file)
fail softly, where killing the process would lose the reply. The filter is applied to every thread of the
worker (``TSYNC``), so a thread started before it is confined too.

Standard library only: the worker loads this file by path (see :mod:`rlcore.envs.sandbox_worker`).
"""

from __future__ import annotations

import ctypes
import errno
import os

LIBRARY_NAMES: tuple[str, ...] = ("libseccomp.so.2",)

# Name -> why the worker needs it. Syscalls absent from an architecture (``time`` on arm64) are skipped.
ALLOWED_SYSCALLS: dict[str, str] = {
    "read": "requests arrive on the request pipe (only that fd, see FD_ARGUMENT)",
    "write": "replies leave on the response pipe (only that fd, see FD_ARGUMENT)",
    "mmap": "the allocator maps anonymous memory (never executable, see NO_EXEC)",
    "mprotect": "the allocator changes protections of its own arenas (never to executable)",
    "munmap": "the allocator returns memory",
    "mremap": "realloc of large blocks",
    "brk": "the heap grows and shrinks",
    "madvise": "the allocator releases pages",
    "futex": "the GIL between the main thread and the parent watchdog thread",
    "sched_yield": "lock hand-over between the two threads",
    "clock_gettime": "time.monotonic / process_time when the vDSO cannot answer",
    "clock_getres": "time.get_clock_info",
    "gettimeofday": "time.time fallback",
    "time": "time.time fallback (x86 only)",
    "clock_nanosleep": "time.sleep (the watchdog polls the parent every 0.5 s)",
    "nanosleep": "sleep fallback",
    "restart_syscall": "a sleep interrupted by a signal resumes",
    "getppid": "the watchdog checks that the parent is alive",
    "getpid": "os.getpid (random checks it after fork)",
    "gettid": "thread identity in the runtime",
    "rt_sigreturn": "return from a signal handler (SIGXCPU at the CPU limit)",
    "rt_sigaction": "signal handlers of the worker itself",
    "rt_sigprocmask": "signal masks of the worker's own threads",
    "sigaltstack": "the runtime's own signal stack",
    "getrandom": "os.urandom / random seeding",
    "exit": "a thread ends",
    "exit_group": "the worker exits",
}

# Syscalls allowed only on one file descriptor (first argument): name -> which pipe.
FD_ARGUMENT: dict[str, str] = {"read": "request", "write": "response"}
# Syscalls allowed only without PROT_EXEC in their third argument: no new machine code can be mapped.
NO_EXEC: tuple[str, ...] = ("mmap", "mprotect")

_PROT_EXEC = 0x4
_ACT_KILL_PROCESS = 0x80000000
_ACT_ALLOW = 0x7FFF0000
_ACT_ERRNO = 0x00050000
_ATTR_ACT_BADARCH = 2
_ATTR_CTL_NNP = 3
_ATTR_CTL_TSYNC = 4
_CMP_EQ = 4
_CMP_MASKED_EQ = 7


class SeccompUnavailable(OSError):
    """The filter cannot be built or installed here; the message says why."""


class _ArgumentComparison(ctypes.Structure):
    # struct scmp_arg_cmp from seccomp.h (libseccomp 2.x ABI, unchanged since 2.0)
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def load_library(names: tuple[str, ...] = LIBRARY_NAMES) -> ctypes.CDLL:
    """Opens libseccomp (by soname, through the dynamic linker's search path); raises SeccompUnavailable."""
    reasons = []
    for name in names:
        try:
            library = ctypes.CDLL(name, use_errno=True)
        except OSError as error:
            reasons.append(str(error))
            continue
        library.seccomp_init.restype = ctypes.c_void_p
        library.seccomp_init.argtypes = [ctypes.c_uint32]
        library.seccomp_release.argtypes = [ctypes.c_void_p]
        library.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        library.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        library.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                                   ctypes.POINTER(_ArgumentComparison)]
        library.seccomp_load.argtypes = [ctypes.c_void_p]
        return library
    raise SeccompUnavailable(f"libseccomp could not be loaded ({'; '.join(reasons)}); install the OS package "
                             "libseccomp2 (Debian/Ubuntu) or libseccomp (Fedora/RHEL/Arch)")


class AllowListFilter:
    """The worker's filter, built before the file system goes away and installed just before untrusted code.

    ``request_fd`` and ``response_fd`` are the only descriptors ``read`` and ``write`` may use.
    """

    def __init__(self, request_fd: int, response_fd: int, library_names: tuple[str, ...] = LIBRARY_NAMES) -> None:
        self._library = load_library(library_names)
        self._context = self._library.seccomp_init(_ACT_ERRNO | errno.EPERM)
        if not self._context:
            raise SeccompUnavailable("seccomp_init failed")
        try:
            self._set(_ATTR_ACT_BADARCH, _ACT_KILL_PROCESS)
            self._set(_ATTR_CTL_NNP, 1)
            self._set(_ATTR_CTL_TSYNC, 1)
            pipes = {"request": request_fd, "response": response_fd}
            self.allowed: list[str] = []
            for name in ALLOWED_SYSCALLS:
                number = self._library.seccomp_syscall_resolve_name(name.encode())
                if number < 0:  # not a syscall of this architecture
                    continue
                if name in FD_ARGUMENT:
                    conditions = [_ArgumentComparison(0, _CMP_EQ, pipes[FD_ARGUMENT[name]], 0)]
                elif name in NO_EXEC:
                    conditions = [_ArgumentComparison(2, _CMP_MASKED_EQ, _PROT_EXEC, 0)]
                else:
                    conditions = []
                array = (_ArgumentComparison * max(1, len(conditions)))(*conditions)
                result = self._library.seccomp_rule_add_array(self._context, _ACT_ALLOW, number, len(conditions),
                                                              array)
                if result < 0:
                    raise SeccompUnavailable(f"seccomp_rule_add({name}) failed: {os.strerror(-result)}")
                self.allowed.append(name)
        except BaseException:
            self._library.seccomp_release(self._context)
            self._context = None
            raise

    def install(self) -> None:
        """Loads the filter into the kernel for every thread of this process (irreversible)."""
        if self._context is None:
            raise SeccompUnavailable("the filter was already installed or released")
        try:
            result = self._library.seccomp_load(self._context)
        finally:
            self._library.seccomp_release(self._context)
            self._context = None
        if result < 0:
            raise SeccompUnavailable(f"seccomp_load failed: {errno.errorcode.get(-result, result)} "
                                     f"({os.strerror(-result)})")

    def release(self) -> None:
        """Frees the filter without installing it."""
        if self._context is not None:
            self._library.seccomp_release(self._context)
            self._context = None

    def _set(self, attribute: int, value: int) -> None:
        result = self._library.seccomp_attr_set(self._context, attribute, value)
        if result < 0:
            raise SeccompUnavailable(f"seccomp_attr_set({attribute}) failed: {os.strerror(-result)}")
