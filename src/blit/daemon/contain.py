"""Containment: resolve a client's module-relative path without ever leaving the module.

Every path a client sends is split by `protocol.split_path` (NUL, absolute paths and ".." are
refused there) and then opened one component at a time with `openat(..., O_NOFOLLOW |
O_DIRECTORY)` from the module's root directory: a symlink anywhere on the way is refused, never
followed, whether it points inside or outside the module, and a directory renamed or replaced by
a link during the walk cannot redirect it (each step is relative to the fd of the previous one).
The last component is looked at with lstat or opened with O_NOFOLLOW. This is the portable form
of Linux's openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS); decisions-remote.md says why the walk
is enough.

Blocking code: call it from a worker thread. This module must not import trio.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..transport.protocol import MAX_MESSAGE, Entry, ErrorCode, Refused, split_path

_T = TypeVar("_T")

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
O_FILE = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | getattr(os, "O_NOCTTY", 0)


def _show(parts: list[bytes], upto: int | None = None) -> str:
    return "/".join(p.decode("utf-8", "backslashreplace") for p in parts[:upto]) or "/"


def label(module: str, path: bytes) -> str:
    """A module path as the user wrote it after the host: `/module/path`, `//path` (root export)."""
    text = path.decode("utf-8", "surrogateescape")
    return f"//{text}" if module == "" else f"/{module}" + (f"/{text}" if text else "")


def open_root(root: Path) -> int:
    """Open a module's root directory (the admin's configured path may go through links)."""
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused(ErrorCode.IO_ERROR, f"the module directory is not available: {exc.strerror}") from None


def walk_dir(root_fd: int, parts: list[bytes]) -> int:
    """Open the directory `parts` below `root_fd`, refusing symlinks on the way; returns an fd.

    Raises:
        Refused: NOT_FOUND, NOT_A_DIRECTORY, PATH_REFUSED (a symlink), IO_ERROR.
    """
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                nfd = os.open(part, O_DIR, dir_fd=fd)
            except OSError as exc:
                raise _refusal(exc, fd, part, parts, i) from exc  # the kernel's reason, for OSError callers
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _refusal(exc: OSError, parent_fd: int, part: bytes, parts: list[bytes], i: int) -> Refused:
    where = _show(parts, i + 1)
    if exc.errno == errno.ENOENT:
        return Refused(ErrorCode.NOT_FOUND, f"{where}: no such file or directory")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        try:
            st = os.lstat(part, dir_fd=parent_fd)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            return Refused(ErrorCode.PATH_REFUSED, f"{where} is a symbolic link; links are never followed")
        return Refused(ErrorCode.NOT_A_DIRECTORY, f"{where}: not a directory")
    if exc.errno == errno.EACCES:
        return Refused(ErrorCode.IO_ERROR, f"{where}: permission denied")
    return Refused(ErrorCode.IO_ERROR, f"{where}: {exc.strerror}")


def resolve_parent(root_fd: int, path: bytes) -> tuple[int, bytes | None, list[bytes]]:
    """(fd of the parent directory, last name or None for the root itself, all parts)."""
    parts = split_path(path)
    if not parts:
        return os.dup(root_fd), None, parts
    return walk_dir(root_fd, parts[:-1]), parts[-1], parts


KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
}


def entry_of(name: bytes, st: os.stat_result, dir_fd: int) -> Entry:
    kind = KINDS.get(stat.S_IFMT(st.st_mode), "other")
    target = None
    if kind == "symlink":
        try:
            target = os.readlink(name, dir_fd=dir_fd) if name else None
        except OSError:
            target = None
    return Entry(
        name=name,
        kind=kind,
        size=st.st_size if kind == "file" else 0,
        mtime_ns=st.st_mtime_ns,
        mode=st.st_mode,
        target=target if isinstance(target, bytes) else None,
    )


def _looked_up(root: Path, path: bytes, use: Callable[[int, bytes | None, os.stat_result], _T]) -> _T | None:
    """`use(directory fd, last name, its lstat)` for module/path (name None and the directory's
    own fstat for the module's top); None if the last name does not exist."""
    root_fd = open_root(root)
    try:
        dfd, name, _parts = resolve_parent(root_fd, path)
    finally:
        os.close(root_fd)
    try:
        try:
            st = os.fstat(dfd) if name is None else os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            return None
        return use(dfd, name, st)
    finally:
        os.close(dfd)


def stat_path(root: Path, path: bytes) -> tuple[Entry | None, tuple[int, int]]:
    """lstat of module/path (never following a link); None if the last name does not exist.
    With the entry its (device, inode) ((0, 0) with None)."""
    got = _looked_up(root, path, lambda dfd, name, st: (entry_of(name or b"", st, dfd), (st.st_dev, st.st_ino)))
    return got if got is not None else (None, (0, 0))


def unreadable(root: Path, path: bytes) -> str:
    """Why module/path cannot be read as a transfer's source root (fsops.source_unreadable,
    never following a link); "" when it can, or when it does not exist (the transfer reports
    that)."""
    from .. import fsops

    return _looked_up(root, path, lambda dfd, name, st: fsops.source_unreadable(name or b".", st.st_mode, dir_fd=dfd)) or ""


PAGE_BYTES = MAX_MESSAGE // 2
"""A listing page stops at about this many bytes of names and link targets (the encoding's
overhead must fit the message limit too): a page of long link targets is shorter, never refused."""


def list_dir(root: Path, path: bytes, after: bytes | None, limit: int) -> tuple[list[Entry], bool]:
    """The entries of a directory (lstat each), sorted by name bytes, after `after`, at most
    `limit` and about PAGE_BYTES; `more` when entries are left."""
    root_fd = open_root(root)
    try:
        dfd = walk_dir(root_fd, split_path(path))
    finally:
        os.close(root_fd)
    try:
        names = sorted(os.fsencode(n) for n in os.listdir(dfd))
        if after is not None:
            import bisect

            names = names[bisect.bisect_right(names, after) :]
        out: list[Entry] = []
        size = 0
        for name in names:
            if len(out) == limit or size > PAGE_BYTES:
                return out, True
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                continue
            except OSError as exc:  # a directory readable but not searchable: name the entry
                raise Refused(ErrorCode.IO_ERROR, f"cannot examine {_show(split_path(path) + [name])}: {exc.strerror}") from None
            e = entry_of(name, st, dfd)
            out.append(e)
            size += 64 + len(name) + len(e.target or b"")
        return out, False
    finally:
        os.close(dfd)


def open_file(root_fd: int, parts: list[bytes]) -> int:
    """Open a regular file for reading below `root_fd` without following any link."""
    if not parts:
        raise IsADirectoryError(errno.EISDIR, "is the transfer root")
    dfd = walk_dir(root_fd, parts[:-1])
    try:
        fd = os.open(parts[-1], O_FILE | os.O_NONBLOCK, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link; links are never followed") from None
        raise
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
