"""Kernel layers a sandbox worker puts around itself before untrusted code runs (Linux, stdlib + ctypes only).

The worker (:mod:`rlcore.envs.sandbox_worker`) applies them in this order while it is still single-threaded
(entering a user namespace requires that), after importing everything it will need:

1. :func:`isolate`. Not root: new user, network and mount namespaces (no privilege needed where the kernel
   allows unprivileged user namespaces), an empty read-only tmpfs as the root directory (so ``/proc``, ``/etc``
   and every user file are gone), then no capabilities. Root: new network and mount namespaces and the same
   empty root, then an unprivileged uid of the worker's own; where namespaces are refused (a container's
   seccomp profile) a chroot into an empty directory instead.
2. :func:`set_no_new_privs`: nothing can gain privileges again (also what Landlock and seccomp require).
3. :func:`restrict_with_landlock`: no file access at all, and, as far as the kernel's Landlock ABI goes, no TCP
   bind/connect and no signals or abstract unix sockets reaching processes outside the worker.
4. (in the worker) resource limits, then the seccomp allow-list of :mod:`rlcore.envs.seccomp_filter`, the wall.

Each layer either works or raises :class:`LayerUnavailable` naming the step and the kernel's reason; the
worker reports which layers are active and the parent decides whether that is enough.
"""

from __future__ import annotations

import ctypes
import os
import stat

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_CAPABILITY_VERSION_3 = 0x20080522
# Landlock syscall numbers are the same on every architecture (new syscalls share one table since Linux 5.1).
_LANDLOCK_CREATE_RULESET = 444
_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1


class LayerUnavailable(OSError):
    """A confinement layer could not be applied; the message names the step and the reason."""


class _CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapabilityData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _LandlockRulesetAttributes(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter is linked against
        _LIBC.syscall.restype = ctypes.c_long
    return _LIBC


def _check(result: int, what: str) -> int:
    if result < 0:
        number = ctypes.get_errno()
        raise LayerUnavailable(number, f"{what}: {os.strerror(number)}")
    return result


def isolate(*, uid: int | None, namespaces: bool, mountpoint: str, fallback_root: str | None) -> dict:
    """Namespaces, an empty root directory and (as root) an unprivileged ``uid``; returns what is active.

    ``mountpoint`` is any existing directory (the empty tmpfs is mounted over it in the private mount
    namespace, then becomes the root); ``fallback_root`` is the directory a root worker chroots into when
    namespaces are refused. The result has ``user_namespace``, ``network_namespace``, ``mount_namespace``,
    ``chroot``, ``uid``, ``privileges_dropped``, ``capabilities`` (the effective set, 0 when all are gone) and
    ``unavailable`` (layer -> reason).
    """
    as_root = os.geteuid() == 0
    report: dict = {"user_namespace": False, "network_namespace": False, "mount_namespace": False,
                    "chroot": False, "unavailable": {}}
    if namespaces:
        try:
            if as_root:
                _check(_libc().unshare(_CLONE_NEWNS | _CLONE_NEWNET), "unshare(network, mount)")
            else:
                outer_uid, outer_gid = os.getuid(), os.getgid()
                _check(_libc().unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET),
                       "unshare(user, network, mount)")
                report["user_namespace"] = report["network_namespace"] = report["mount_namespace"] = True
                # The same ids inside as outside: files and signals keep meaning what they meant.
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", f"{outer_uid} {outer_uid} 1")
                _write("/proc/self/gid_map", f"{outer_gid} {outer_gid} 1")
            report["network_namespace"] = report["mount_namespace"] = True
            _enter_empty_root(mountpoint)
            report["chroot"] = True
        except OSError as error:
            report["unavailable"]["namespaces"] = str(error)
    else:
        report["unavailable"]["namespaces"] = "turned off (SandboxLimits.namespaces=False)"
    if as_root and not report["chroot"] and fallback_root is not None:
        try:
            _chroot_into_new_directory(fallback_root)
            report["chroot"] = True
        except OSError as error:
            report["unavailable"]["chroot"] = f"chroot into {fallback_root}: {error}"
    if as_root and uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    try:
        report["capabilities"] = _drop_capabilities()
    except OSError as error:
        report["capabilities"] = None
        report["unavailable"]["capabilities"] = str(error)
    report["uid"] = os.getuid()
    report["privileges_dropped"] = os.getuid() != 0 and os.geteuid() != 0
    return report


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _enter_empty_root(mountpoint: str) -> None:
    libc = _libc()
    # Private first, or (as root) the new mount would propagate back to the host's mount namespace.
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount(/, private)")
    _check(libc.mount(b"tmpfs", mountpoint.encode(), b"tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                      b"size=4k,mode=0555"), "mount(empty tmpfs)")
    os.chdir(mountpoint)
    os.chroot(".")
    os.chdir("/")


def _chroot_into_new_directory(path: str) -> None:
    """Creates ``path`` (mode 700, in a parent that only we can write) and makes it the root directory."""
    parent = os.path.dirname(path)
    try:
        os.mkdir(parent, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(parent)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise LayerUnavailable(f"{parent} is not a directory owned and only writable by uid {os.geteuid()}")
    os.mkdir(path, 0o700)
    os.chdir(path)
    os.chroot(".")
    os.chdir("/")


def _drop_capabilities() -> int:
    """Empties the effective, permitted and inheritable sets (those of a user namespace's owner included)."""
    libc = _libc()
    header = _CapabilityHeader(_CAPABILITY_VERSION_3, 0)
    empty = (_CapabilityData * 2)()
    _check(libc.capset(ctypes.byref(header), empty), "capset")
    current = (_CapabilityData * 2)()
    _check(libc.capget(ctypes.byref(header), current), "capget")
    return current[0].effective | (current[1].effective << 32)


def set_no_new_privs() -> None:
    libc = _libc()
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise LayerUnavailable("prctl(PR_SET_NO_NEW_PRIVS) did not take effect")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; raises LayerUnavailable when Landlock is absent or disabled."""
    abi = _libc().syscall(ctypes.c_long(_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                          ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return _check(abi, "landlock_create_ruleset(version)")


def restrict_with_landlock() -> int:
    """Denies all file system access (and TCP, outside signals, abstract sockets where the ABI has them).

    Needs no_new_privs. A ruleset that handles every access right and allows none is the whole policy.
    Returns the ABI version used.
    """
    abi = landlock_abi()
    # Access rights by ABI: 13 file rights in v1, REFER in v2, TRUNCATE in v3, IOCTL_DEV in v5.
    file_rights = 13 + (abi >= 2) + (abi >= 3) + (abi >= 5)
    attributes = _LandlockRulesetAttributes(handled_access_fs=(1 << file_rights) - 1)
    size = 8
    if abi >= 4:  # TCP bind and connect
        attributes.handled_access_net = 0b11
        size = 16
    if abi >= 6:  # abstract unix sockets and signals outside the domain
        attributes.scoped = 0b11
        size = 24
    libc = _libc()
    ruleset = _check(libc.syscall(ctypes.c_long(_LANDLOCK_CREATE_RULESET), ctypes.byref(attributes),
                                  ctypes.c_size_t(size), ctypes.c_uint32(0)), "landlock_create_ruleset")
    try:
        _check(libc.syscall(ctypes.c_long(_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def open_fds(upto: int = 256) -> list[int]:
    """The descriptors below ``upto`` that are open (probed one by one: /proc may already be gone)."""
    still_open = []
    for fd in range(upto):
        try:
            os.fstat(fd)
        except OSError:
            continue
        still_open.append(fd)
    return still_open
