"""Blocking filesystem primitives: scan a directory, land a file atomically, carry metadata.

Everything here is plain synchronous code that runs in a worker thread or a worker process,
always relative to directory file descriptors so that paths longer than PATH_MAX and names that
are not UTF-8 work. Names are `str` decoded with surrogateescape (what `os.scandir(fd)` yields);
`os.fsencode` turns them back into the exact bytes.

This module must not import trio, print, or keep state between calls beyond small per-process
caches of what the kernel supports.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
from contextlib import contextmanager
from typing import Any, Callable, Collection, Iterable, Iterator, NamedTuple

from . import ffi
from .filters import Filters

# Open flags used everywhere.
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
O_SRC = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
"""How a source file is opened: never through a link, and never waiting (a FIFO put in a
file's place since the scan would block the open; open_source then refuses it)."""


def open_source(dir_fd: int, name: str) -> int:
    """Open source file `name` for reading (O_SRC); OSError(EINVAL, "not a regular file") when
    something else took its name since it was listed."""
    fd = os.open(name, O_SRC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd
O_TMPFILE = getattr(os, "O_TMPFILE", 0)

TMP_PREFIX = ".blit-"
TMP_SUFFIX = ".tmp"

CHANGED_SIZE = "file changed size while being read"
"""Why a file whose size changed while it was read is not landed (every topology says so)."""

# Longest path handed to one syscall; longer relative paths are opened one chunk at a time.
_PATH_CHUNK = 3000

# Xattr namespaces an unprivileged process may not be able to read or write: failures there are
# expected ("where permitted"), failures on user.* are reported.
_PRIVILEGED_XATTR = ("security.", "trusted.", "system.")
_ACL_ACCESS = "system.posix_acl_access"
_ACL_DEFAULT = "system.posix_acl_default"

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
EUID = os.geteuid() if hasattr(os, "geteuid") else -1
EGID = os.getegid() if hasattr(os, "getegid") else -1


def _read_umask() -> int:
    """The process umask, read without changing it (other threads may be creating files)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


UMASK = _read_umask()


class Meta(NamedTuple):
    """The part of an lstat result a transfer needs, with os.stat_result's field names, so code
    takes either: workers use stat results as they come, and build a Meta only for what crosses a
    process boundary (small, picklable)."""

    st_mode: int
    st_size: int
    st_mtime_ns: int
    st_atime_ns: int
    st_uid: int
    st_gid: int
    st_ino: int
    st_dev: int
    st_nlink: int
    st_rdev: int
    st_blocks: int


def meta_of(st: os.stat_result | Meta) -> Meta:
    if type(st) is Meta:
        return st
    return Meta(
        st.st_mode,
        st.st_size,
        st.st_mtime_ns,
        st.st_atime_ns,
        st.st_uid,
        st.st_gid,
        st.st_ino,
        st.st_dev,
        st.st_nlink,
        st.st_rdev,
        getattr(st, "st_blocks", 0),
    )


def is_sparse(m: Meta | os.stat_result) -> bool:
    """A regular file whose allocated size is well below its length (holes worth keeping)."""
    return m.st_size > 65536 and m.st_blocks * 512 < m.st_size - 65536


# --------------------------------------------------------------------------------------------
# Directories


def open_rel(root_fd: int, rel: str) -> int:
    """Open directory `rel` (relative to `root_fd`, "" for the root), following a symlink in none
    of its components: a directory swapped for a symlink while a run walks the tree is refused
    (ELOOP), never followed out of it. Paths of any length."""
    if not rel:
        return os.open(".", O_DIR, dir_fd=root_fd)
    parts = rel.split("/")
    chunks: list[str] = []  # at most _PATH_CHUNK bytes each, whole components
    chunk: list[str] = []
    size = 0
    for part in parts:
        if chunk and size + len(part) + 1 > _PATH_CHUNK:
            chunks.append("/".join(chunk))
            chunk, size = [], 0
        chunk.append(part)
        size += len(part) + 1
    chunks.append("/".join(chunk))
    return _descend(root_fd, chunks, _open_beneath)


def _open_beneath(dir_fd: int, path: str) -> int:
    """open_rel's step: one openat2 where the kernel has it, else a component at a time."""
    from .ffi import scan as cscan

    if cscan.HAVE_CMPDIR:
        fd = cscan.open_dir_beneath(dir_fd, os.fsencode(path))
        if fd >= 0:
            return fd
    # O_DIR has O_NOFOLLOW: ELOOP for a symlink
    return _descend(dir_fd, path.split("/"), lambda fd, part: os.open(part, O_DIR, dir_fd=fd))


def _descend(start_fd: int, steps: list[str], step: Callable[[int, str], int]) -> int:
    """Open `steps` each below the last, from `start_fd` (left open): the fds on the way are
    closed, and on failure nothing opened here stays open."""
    fd = start_fd
    try:
        for s in steps:
            nfd = step(fd, s)
            if fd != start_fd:
                os.close(fd)
            fd = nfd
    except BaseException:
        if fd != start_fd:
            os.close(fd)
        raise
    return fd


@contextmanager
def dir_at(root_fd: int, rel: str) -> Iterator[int]:
    """`with dir_at(root, rel) as fd:` the directory open for the block, closed after it."""
    fd = open_rel(root_fd, rel)
    try:
        yield fd
    finally:
        os.close(fd)


def open_root(path: bytes) -> int:
    """Open a transfer root directory given as an absolute path (any length)."""
    if len(path) <= _PATH_CHUNK:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    base = os.open(b"/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_rel(base, os.fsdecode(path.lstrip(b"/")))
    finally:
        os.close(base)


NS_MIN, NS_MAX = -(1 << 63), (1 << 63) - 1
"""The times blit keeps: int64 nanoseconds (the years 1677-2262), in memory, in the C module
and on the wire."""


def check_times(st: os.stat_result) -> None:
    """Raise OSError(EOVERFLOW) for a source entry whose times blit cannot keep: it is reported
    and left out, never landed with a wrapped or clamped time."""
    if not (NS_MIN <= st.st_mtime_ns <= NS_MAX and NS_MIN <= st.st_atime_ns <= NS_MAX):
        raise OSError(errno.EOVERFLOW, "its time is outside the years 1677-2262, which blit cannot keep")


def scan(dir_fd: int, *, source: bool = False) -> tuple[list[tuple[str, os.stat_result]], list[tuple[str, OSError]]]:
    """List a directory with one lstat per entry.

    Returns (entries, errors): entries as (name, Meta); errors for entries that vanished or could
    not be stat'ed, and (`source`) those whose times blit cannot keep (check_times). A source
    leaves out temporaries (is_tmp_name): another run's hidden directory or file in flight, or
    one an interrupted run left, is never sent. Raises OSError when the directory itself cannot
    be read.
    """
    out: list[tuple[str, os.stat_result]] = []
    errs: list[tuple[str, OSError]] = []
    append = out.append
    # scandir(fd) dups the fd and closes its copy; the caller keeps dir_fd.
    with os.scandir(dir_fd) as it:
        for e in it:
            if source and is_tmp_name(e.name):
                continue
            try:
                st = e.stat(follow_symlinks=False)
                if source:
                    check_times(st)
                append((e.name, st))
            except OSError as exc:
                errs.append((e.name, exc))
    return out, errs


def scan_names(dir_fd: int, names: Iterable[str], *, source: bool = False) -> tuple[list[tuple[str, os.stat_result]], list[tuple[str, OSError]]]:
    """`scan` of only these names of a directory (`SRC` without a slash: the parent's other
    entries are no part of the transfer, and a failure among them is none of its business).
    A name that is not there is an error (ENOENT), as one that vanished from a listing is."""
    out: list[tuple[str, os.stat_result]] = []
    errs: list[tuple[str, OSError]] = []
    for name in names:
        if source and is_tmp_name(name):
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if source:
                check_times(st)
            out.append((name, st))
        except OSError as exc:
            errs.append((name, exc))
    return out, errs


def open_up(dfd: int) -> bool:
    """A read-only destination directory of ours (kept from an earlier run, 0555): made writable
    for the entries about to land in it, as rsync does; its mode is put back when the directory
    is finalised. True when it changed; not ours, nothing changes (the writes fail one by one)."""
    st = os.fstat(dfd)
    if st.st_mode & stat.S_IWUSR and st.st_mode & stat.S_IXUSR:
        return False
    try:
        os.fchmod(dfd, stat.S_IMODE(st.st_mode) | stat.S_IWUSR | stat.S_IXUSR)
    except OSError:
        return False
    return True


def open_dst_dir(open_dir: Callable[[int, str], int], root_fd: int, rel: str) -> tuple[int, bool]:
    """A destination directory's fd, as `open_dir(root_fd, rel)` opens it; a directory of ours
    that refuses us (mode 000, kept from an earlier run or made so) is given u+rwx first, as
    rsync does, and (fd, True) says so: its mode comes back when it is finalised. Anything
    else (not ours, running as root, the top) raises as before."""
    try:
        return open_dir(root_fd, rel), False
    except PermissionError:
        if IS_ROOT or not rel:
            raise
        parent, _, name = rel.rpartition("/")
        pfd = open_dir(root_fd, parent)
        try:
            path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
        finally:
            os.close(pfd)
        try:
            st = os.fstat(path_fd)
            if st.st_uid != os.geteuid():
                raise
            os.chmod(f"/proc/self/fd/{path_fd}", stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
        finally:
            os.close(path_fd)
    return open_dir(root_fd, rel), True


def chmod_at(dir_fd: int, name: str, mode: int) -> None:
    """chmod of the entry `name` itself, never of what it points to: a name that another writer
    made a symlink since it was looked at fails (ELOOP) instead of changing a file elsewhere,
    outside a daemon's module say. (Python 3.11's chmod with dir_fd cannot refuse to follow;
    through an O_PATH fd, as glibc's fchmodat does for AT_SYMLINK_NOFOLLOW.)"""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.ELOOP, "it is a symbolic link now (changed meanwhile)")
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def make_dir(parent_fd: int, name: str, acl_inherited: bool = False) -> None:
    """Create a directory writable by us; its real mode is applied when it is finalised.
    `acl_inherited`: the parent has a default ACL (has_default_acl), which the new directory
    would take as its own ACLs, and pass on to what lands in it: dropped at once."""
    os.mkdir(name, 0o700, dir_fd=parent_fd)
    if acl_inherited:
        path = _xattr_path(parent_fd, name)
        drop_inherited_acls(path, (), directory=True)
        chmod_at(parent_fd, name, 0o700)  # the default ACL, not the umask, gave it its mode


def remove_extra(
    parent_fd: int, name: str, rel: str, filters: Filters, gone: list[str] | None = None, stop: Callable[[], bool] | None = None,
    failed: list[tuple[str, str]] | None = None,
) -> tuple[int, bool]:  # fmt: skip
    """Mirror's delete: remove `name` and everything below it except what the filters exclude
    (excluded destination entries are protected, and so are the directories holding them).
    Returns (entries removed, something was kept). `gone` gets what a `delete` line names:
    "" for `name` itself when it went, else the paths below it (relative to it) of the
    outermost entries that went. `stop`, asked before each entry, abandons the rest
    (InterruptedError; `gone` holds what went). `failed`: an entry below `name` that cannot be
    removed (immutable, not ours) goes there as (path, message) and the rest is removed, the
    directories above it kept, as rsync does; without it the first such error is raised.
    `name` itself failing raises either way."""
    return _remove_extra(parent_fd, name, rel, filters, gone, len(rel) + 1, stop, failed)


class _Level:
    """One directory of a tree being deleted (or counted) by mirror, on an explicit stack."""

    __slots__ = ("parent_fd", "name", "rel", "fd", "left", "count", "kept", "inner", "gone")

    def __init__(self, parent_fd: int, name: str, rel: str, fd: int, left: Iterator[tuple[str, str, bool]], gone: list[str] | None) -> None:
        self.parent_fd, self.name, self.rel, self.fd, self.left = parent_fd, name, rel, fd, left
        self.count, self.kept = 0, False
        self.inner: list[str] = []  # what went below it: named if it stays (kept, or a failure)
        self.gone = gone


def _remove_extra(
    parent_fd: int, name: str, rel: str, filters: Filters, gone: list[str] | None, base: int, stop: Callable[[], bool] | None,
    failed: list[tuple[str, str]] | None, dry: bool = False,
) -> tuple[int, bool]:  # fmt: skip
    """remove_extra's walk, and count_extra's (`dry`: nothing is changed; what cannot be looked
    at counts as one that goes). Returns (entries removed, something was kept)."""
    try:
        fd = _open_to_count(parent_fd, name) if dry else _unlink_or_open(parent_fd, name)
    except FileNotFoundError:  # gone before its turn: what the delete wanted, as rsync (not counted)
        if dry:
            raise
        return 0, False
    if fd < 0:
        _went(gone, rel, base)
        return 1, False
    # A loop over an explicit stack, not a recursion: thousands of levels go like any other.
    # Without filters no entry is looked at before it goes (unlink first, as remove_tree).
    listing = _children if filters.active else _plain_children
    stack = [_Level(parent_fd, name, rel, fd, listing(fd, rel), gone)]
    result = (0, True)

    def fail(lv: _Level, path: str, exc: OSError) -> None:
        if failed is None:
            raise exc
        failed.append((path, exc.strerror or str(exc)))
        lv.kept = True

    try:
        while stack:
            lv = stack[-1]
            try:
                nxt = next(lv.left, None)
            except OSError as exc:  # its listing (or an entry's stat) failed: it stays
                if not dry:
                    fail(lv, lv.rel, exc)
                nxt = None
            if nxt is not None:
                child, crel, is_dir = nxt
                if stop is not None and stop():
                    raise InterruptedError(errno.EINTR, "stopped")
                if filters.active and filters.excluded(crel, child, is_dir):
                    lv.kept = True
                    continue
                try:
                    cfd = _open_to_count(lv.fd, child) if dry else _unlink_or_open(lv.fd, child)
                except FileNotFoundError as exc:  # gone before its turn (see above)
                    if dry:
                        fail(lv, crel, exc)
                    continue
                except OSError as exc:
                    fail(lv, crel, exc)
                    continue
                if cfd < 0:
                    _went(lv.inner, crel, base)
                    lv.count += 1
                else:
                    stack.append(_Level(lv.fd, child, crel, cfd, listing(cfd, crel), lv.inner))
                continue
            stack.pop()
            os.close(lv.fd)
            lv.fd = -1
            whole = dry and not lv.kept
            try:
                if not lv.kept and not dry:
                    try:
                        os.rmdir(lv.name, dir_fd=lv.parent_fd)
                        whole = True
                    except FileNotFoundError:  # someone else removed it meanwhile: gone all the same
                        whole = True
                    except OSError as exc:
                        if not stack:  # `name` itself: the caller reports it, and counts what went
                            exc.removed_below = lv.count  # type: ignore[attr-defined]
                            raise
                        fail(stack[-1], lv.rel, exc)
            finally:
                _went(lv.gone, lv.rel, base, lv.inner, whole)
            result = (lv.count + 1, False) if whole else (lv.count, True)
            if stack:
                stack[-1].count += result[0]
                stack[-1].kept |= result[1]
    except BaseException:
        for lv in reversed(stack):  # the innermost first, as a recursion would unwind
            if lv.fd >= 0:
                os.close(lv.fd)
            _went(lv.gone, lv.rel, base, lv.inner, False)
        raise
    return result


def removed_below(exc: OSError) -> int:
    """The entries remove_extra (or remove_extra_opening) removed before it raised `exc`, inside
    a directory whose own removal then failed (they count as deleted, as rsync counts them)."""
    return int(getattr(exc, "removed_below", 0))


def remove_extra_opening(
    parent_fd: int, name: str, rel: str, filters: Filters, gone: list[str] | None = None, stop: Callable[[], bool] | None = None,
    failed: list[tuple[str, str]] | None = None,
) -> int:  # fmt: skip
    """Mirror's delete in a destination directory that may be a read-only one of ours (0555):
    remove_extra; refused, the directory is opened up (open_up: its mode comes back when it is
    finalised) and the removal tried again, as rsync does. Not ours, the refusal is raised.
    Returns the entries removed; an error raised after the first try carries (removed_below)
    what both tries removed."""
    try:
        return remove_extra(parent_fd, name, rel, filters, gone, stop, failed)[0]
    except PermissionError as refused:
        if not open_up(parent_fd):
            raise
        before = removed_below(refused)
    try:
        return before + remove_extra(parent_fd, name, rel, filters, gone, stop, failed)[0]
    except OSError as exc:
        exc.removed_below = before + removed_below(exc)  # type: ignore[attr-defined]
        raise


def _plain_children(fd: int, rel: str) -> Iterator[tuple[str, str, bool]]:
    """_children without a stat of each entry (no filter asks whether it is a directory)."""
    for child in os.listdir(fd):
        yield child, f"{rel}/{child}", False


def _went(gone: list[str] | None, rel: str, base: int, inner: list[str] | None = None, whole: bool = True) -> None:
    """What a `delete` line names: `rel` once it went whole, else what went inside it."""
    if gone is not None:
        if whole:
            gone.append(rel[base:])
        elif inner:
            gone += inner


def below(path: str, sub: str) -> str:
    """`path` joined with a `gone` entry of remove_extra, count_extra or make_way."""
    return f"{path}/{sub}" if sub else path


def count_extra(parent_fd: int, name: str, rel: str, filters: Filters, gone: list[str] | None = None) -> int:
    """A dry run's `remove_extra`: how many entries it would remove (nothing is changed), and
    in `gone` what it would name. An entry that cannot be looked at counts as one."""
    return _count_extra(parent_fd, name, rel, filters, gone, len(rel) + 1)


def _count_extra(parent_fd: int, name: str, rel: str, filters: Filters, gone: list[str] | None, base: int) -> int:
    # A directory holding an excluded entry at any depth stays, with every directory above it.
    return _remove_extra(parent_fd, name, rel, filters, gone, base, None, None, dry=True)[0]


def _open_to_count(parent_fd: int, name: str) -> int:
    """A directory's fd for _count_extra; -1 for anything else or what cannot be opened."""
    try:
        if not stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            return -1
        return os.open(name, O_DIR, dir_fd=parent_fd)
    except OSError:
        return -1


def count_extras(
    root_fd: int, dst_rel: str, names: list[str], filters: Filters, open_dir: Callable[[int, str], int] = open_rel,
    gone: list[str] | None = None,
) -> int:  # fmt: skip
    """A dry run's count of what deleting the extras `names` of directory `dst_rel` would remove
    (count_extra each); each counts as one when the directory cannot be opened. `gone` gets the
    paths (from the transfer root) that the real run's `delete` lines would name."""
    prefix = dst_rel + "/" if dst_rel else ""
    try:
        fd = open_dir(root_fd, dst_rel)
    except OSError:
        if gone is not None:
            gone += (prefix + name for name in names)
        return len(names)
    try:
        n = 0
        for name in names:
            subs: list[str] = []
            n += count_extra(fd, name, prefix + name, filters, subs)
            if gone is not None:
                gone += (below(prefix + name, sub) for sub in subs)
        return n
    finally:
        os.close(fd)


class WayBlocked(OSError):
    """make_way could not remove a directory: `removed` entries inside it went all the same
    (mirror: those the filters do not keep)."""

    def __init__(self, message: str, removed: int = 0) -> None:
        super().__init__(errno.ENOTEMPTY, message)
        self.removed = removed


def make_way(
    parent_fd: int, name: str, rel: str, is_dir: bool, mirror: bool, filters: Filters, dry: bool = False,
    gone: list[str] | None = None,
) -> int:  # fmt: skip
    """Remove the destination entry `name` (path `rel` from the transfer root) that an entry of
    another kind replaces; returns the entries removed (all below a directory counted, as a
    mirror's deletions are). Copy replaces only an empty directory; mirror removes a directory
    with what is in it, except what the filters exclude: those are kept (as rsync keeps them),
    and then the directory stays and this fails (WayBlocked, with what went). Raises OSError;
    its strerror says why. `dry`: change nothing, count and fail as the real run would where
    that can be known without trying. `gone`: as for remove_extra (what went, also when this
    fails)."""
    if dry:
        why = _way_blocked(parent_fd, name, rel, is_dir, mirror, filters)
        if is_dir and mirror:
            n = count_extra(parent_fd, name, rel, filters, gone)
        else:
            n = 1
            if why is None and gone is not None:
                gone.append("")
        if why is not None:
            raise WayBlocked(why, n if mirror else 0)
        return n
    if is_dir and not mirror:
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise WayBlocked(_NOT_EMPTY) from None
            raise
        if gone is not None:
            gone.append("")
        return 1
    n, kept = remove_extra(parent_fd, name, rel, filters, gone)
    if kept:
        raise WayBlocked(_HOLDS_EXCLUDED, n)
    return n


_NOT_EMPTY = "directory not empty (mirror replaces it)"
_HOLDS_EXCLUDED = "directory holds excluded entries, which mirror keeps"


def _way_blocked(parent_fd: int, name: str, rel: str, is_dir: bool, mirror: bool, filters: Filters) -> str | None:
    """Why make_way would fail to remove `name`; None when it would succeed as far as can be
    known without trying (permissions are not predicted)."""
    if not is_dir:
        return None
    if not mirror:
        fd = os.open(name, O_DIR, dir_fd=parent_fd)
        try:
            return _NOT_EMPTY if os.listdir(fd) else None
        finally:
            os.close(fd)
    return _HOLDS_EXCLUDED if filters.active and _holds_excluded(parent_fd, name, rel, filters) else None


def _holds_excluded(parent_fd: int, name: str, rel: str, filters: Filters) -> bool:
    """Whether the directory `name` holds, at any depth, an entry the filters exclude."""
    fd = os.open(name, O_DIR, dir_fd=parent_fd)
    try:
        return any(
            filters.excluded(crel, child, is_dir) or (is_dir and _holds_excluded(fd, child, crel, filters))
            for child, crel, is_dir in _children(fd, rel)
        )
    finally:
        os.close(fd)


def _children(fd: int, rel: str) -> Iterator[tuple[str, str, bool]]:
    """The entries of the open directory `fd` (path `rel` from the transfer root): name, path,
    whether it is a directory (not following links), as mirror's filters need them."""
    for child in os.listdir(fd):
        yield child, f"{rel}/{child}", stat.S_ISDIR(os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode)


def tally_tree(parent_fd: int, name: str) -> tuple[int, int, int, int]:
    """What a tree a run made holds, as its counters counted it: (regular files, their bytes,
    directories, links: symlinks, special files and hard links to a file counted before).
    Nothing is followed or changed; what cannot be read is not counted."""
    files = nbytes = dirs = links = 0
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[int, str | None]] = [(parent_fd, name)]  # (dir fd, name); None: close the fd
    while stack:
        pfd, n = stack.pop()
        if n is None:  # every entry of that directory is done
            os.close(pfd)
            continue
        try:
            st = os.stat(n, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(n, O_DIR, dir_fd=pfd)
                dirs += 1
                stack.append((fd, None))
                stack.extend((fd, c) for c in os.listdir(fd))
            elif stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                if st.st_nlink > 1:
                    seen.add((st.st_dev, st.st_ino))
                files += 1
                nbytes += st.st_size
            else:
                links += 1
        except OSError:
            pass
    return files, nbytes, dirs, links


CHANGED_SINCE_COPIED = "changed since it was copied; kept"
"""Move: why a source entry stays (the remote sender says the same, transport/tree.py)."""


def unlink_unchanged(dir_fd: int, name: str, m: Meta) -> None:
    """Move's removal of a source entry whose copy landed: unlink `name` unless it is no longer
    what was listed as `m` (another inode or kind, size or mtime: written to, or replaced,
    since). Raises OSError; CHANGED_SINCE_COPIED as its strerror when it changed."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if (
        st.st_ino != m.st_ino
        or stat.S_IFMT(st.st_mode) != stat.S_IFMT(m.st_mode)
        or st.st_size != m.st_size
        or st.st_mtime_ns != m.st_mtime_ns
    ):
        raise OSError(errno.EAGAIN, CHANGED_SINCE_COPIED)
    os.unlink(name, dir_fd=dir_fd)


def remove_tree(parent_fd: int, name: str, stop: Callable[[], bool] | None = None) -> int:
    """Remove `name` (any kind) below parent_fd, with everything below it; returns entries
    removed. `stop`, asked before each entry, abandons the rest (InterruptedError). A loop, not
    a recursion: a tree thousands of levels deep (a fd per level) goes like any other."""
    if stop is not None and stop():
        raise InterruptedError(errno.EINTR, "stopped")
    fd = _unlink_or_open(parent_fd, name)
    if fd < 0:
        return 1
    count = 0
    stack = [(parent_fd, name, fd, _names_of(fd))]  # (parent fd, name, its fd, names left)
    try:
        while stack:
            pfd, dname, dfd, left = stack[-1]
            child = next(left, None)
            if child is None:
                stack.pop()
                os.close(dfd)
                os.rmdir(dname, dir_fd=pfd)
                count += 1
                continue
            if stop is not None and stop():
                raise InterruptedError(errno.EINTR, "stopped")
            cfd = _unlink_or_open(dfd, child)
            if cfd < 0:
                count += 1
            else:
                stack.append((dfd, child, cfd, _names_of(cfd)))
    except BaseException:
        for _, _, dfd, _ in stack:
            os.close(dfd)
        raise
    return count


def _names_of(fd: int) -> Iterator[str]:
    """The names in the open directory `fd`, read at once; the fd is closed if that fails."""
    try:
        return iter(os.listdir(fd))
    except BaseException:
        os.close(fd)
        raise


def _unlink_or_open(parent_fd: int, name: str) -> int:
    """Unlink `name` and return -1; or, a directory, open it to empty it and return its fd (a
    read-only directory we own is made writable, so that we can delete inside it). A directory
    in a parent we may not write is emptied too (its own rmdir then fails), as rsync does."""
    refused: OSError | None = None
    try:
        os.unlink(name, dir_fd=parent_fd)
        return -1
    except IsADirectoryError:
        pass
    except OSError as exc:
        # EPERM: POSIX's answer for a directory, Linux's for an immutable file; EACCES: the
        # parent is not ours to change, checked before the entry's kind.
        if exc.errno not in (errno.EPERM, errno.EACCES):
            raise
        refused = exc
    try:
        fd = os.open(name, O_DIR, dir_fd=parent_fd)
    except OSError as exc:
        if refused is not None and (exc.errno in (errno.ENOTDIR, errno.ELOOP) or refused.errno == errno.EACCES):
            raise refused from None
        raise
    try:
        st = os.fstat(fd)
        if not st.st_mode & stat.S_IWUSR:
            os.chmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_dir_meta(fd: int, m: Meta, xattrs: list[tuple[str, bytes]] | None) -> None:
    """Apply owner, xattrs, mode and times to an open directory; owner, mode and times only when
    they differ (one fstat, after the xattrs, whose ACLs may have moved the mode): a directory
    already as asked, the top of a run that changed nothing say, keeps its ctime, and one that
    is not ours (EPERM otherwise) is no failure (a mirror that only emptied an extra directory
    inside it changed nothing in it; rsync says nothing)."""
    if xattrs:
        put_xattrs(fd, xattrs, "directory")
    d = os.fstat(fd)
    if (
        stat.S_IMODE(d.st_mode) == stat.S_IMODE(m.st_mode)
        and d.st_mtime_ns == m.st_mtime_ns
        and (not IS_ROOT or (d.st_uid, d.st_gid) == (m.st_uid, m.st_gid))
    ):
        return
    if IS_ROOT:
        os.fchown(fd, m.st_uid, m.st_gid)
    os.fchmod(fd, stat.S_IMODE(m.st_mode))
    os.utime(fd, ns=(m.st_atime_ns, m.st_mtime_ns))


# --------------------------------------------------------------------------------------------
# Extended attributes


def get_xattrs(fd: int) -> list[tuple[str, bytes]]:
    """All xattrs we may read from an open file (ACLs included); [] when none or unsupported."""
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
            return []
        raise
    out = []
    for n in names:
        try:
            out.append((n, os.getxattr(fd, n)))
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.EPERM, errno.EACCES, errno.ENOTSUP):
                continue
            raise
    return out


def _xattr_path(dir_fd: int, name: str) -> str:
    # One lookup through the directory fd: os.*xattr take no dir_fd, and this stays short
    # whatever the depth of the tree.
    return f"/proc/self/fd/{dir_fd}/{name}"


def xattrs_at(dir_fd: int, name: str) -> dict[str, bytes]:
    """The xattrs of an entry (not following symlinks); {} when none or unsupported."""
    p = _xattr_path(dir_fd, name)
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
            return {}
        raise
    out = {}
    for n in names:
        try:
            out[n] = os.getxattr(p, n, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.EPERM, errno.EACCES, errno.ENOTSUP):
                continue
            raise
    return out


def have_xattrs(dir_fd: int, names: list[str], base: str | None, use_cwd: bool) -> list[bool]:
    """For each name in one directory: does it carry any xattr? One listxattr per name, by the
    cheapest path: relative to the cwd after one fchdir (only where nothing else shares the
    cwd: worker processes), else an absolute path, else through /proc/self/fd."""
    if use_cwd:
        os.fchdir(dir_fd)
        prefix = ""
    elif base is not None and len(base) < _PATH_CHUNK:
        prefix = base + "/" if base else "/"
    else:
        prefix = f"/proc/self/fd/{dir_fd}/"
    out = []
    listx = os.listxattr
    for n in names:
        try:
            out.append(bool(listx(prefix + n, follow_symlinks=False)))
        except OSError as exc:
            # Unsupported here: nothing to carry. Anything else: let sync_xattrs look closer.
            out.append(exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP))
    return out


def sync_xattrs(src_dir: int, name: str, dst_dir: int, dname: str) -> bool:
    """Make an up-to-date destination entry's xattrs (and ACLs) equal the source's; True if
    anything changed. Costs one listxattr per side when neither has any."""
    ps, pd = _xattr_path(src_dir, name), _xattr_path(dst_dir, dname)
    try:
        if not os.listxattr(ps, follow_symlinks=False) and not os.listxattr(pd, follow_symlinks=False):
            return False
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
            return False
        raise
    a, b = xattrs_at(src_dir, name), xattrs_at(dst_dir, dname)
    return replace_xattrs(dst_dir, dname, b, a)


def replace_xattrs(dir_fd: int, name: str, current: dict[str, bytes], wanted: dict[str, bytes]) -> bool:
    """Make an entry's xattrs, now `current`, equal `wanted`; True if anything changed.
    Privileged names (security., trusted., system.) that we may not set are left as they are."""
    if current == wanted:
        return False
    path = _xattr_path(dir_fd, name)
    for n, v in wanted.items():
        if current.get(n) != v:
            try:
                os.setxattr(path, n, v, follow_symlinks=False)
            except OSError as exc:
                if not (n.startswith(_PRIVILEGED_XATTR) and exc.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP)):
                    raise _xattr_failed(exc, n) from exc
    for n in current.keys() - wanted.keys():
        try:
            os.removexattr(path, n, follow_symlinks=False)
        except OSError as exc:
            if not (n.startswith(_PRIVILEGED_XATTR) and exc.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.ENODATA)):
                raise OSError(exc.errno, f"removing xattr {n}: {exc.strerror}") from exc
    return True


def has_default_acl(dir_fd: int) -> bool:
    """Whether entries created in this directory inherit its default ACL (instead of the umask
    shaping their mode). Rare; one getxattr per destination directory that receives entries."""
    try:
        os.getxattr(dir_fd, _ACL_DEFAULT)
    except OSError:
        return False  # ENODATA, or no ACLs here at all
    return True


def creates_under_acl(dir_fd: int, made_for_run: bool, creates: bool) -> bool:
    """Whether the entries about to be created in destination directory `dir_fd` inherit its
    default ACL, which each must then drop (`creates`: some will be created). A directory made
    for the run by mkdir -p under a parent with a default ACL drops what it inherited here,
    whether or not anything lands in it, and answers False; the directories a transfer makes
    below it never have one (make_dir drops it)."""
    if not (made_for_run or creates) or not has_default_acl(dir_fd):
        return False
    if made_for_run:
        drop_inherited_acls(dir_fd, (), directory=True)
        return False
    return True


def drop_inherited_acls(target: int | str, keep: Collection[str], directory: bool = False) -> None:
    """Remove from a new entry (an fd, or a /proc/self/fd path that is not followed) the ACLs it
    inherited from its directory's default ACL, except those named in `keep` (the source's,
    set right after). The entry's mode must be set again afterwards."""
    for n in (_ACL_ACCESS, _ACL_DEFAULT) if directory else (_ACL_ACCESS,):
        if n in keep:
            continue
        try:
            if isinstance(target, int):
                os.removexattr(target, n)
            else:
                os.removexattr(target, n, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise OSError(exc.errno, f"removing inherited ACL {n}: {exc.strerror}") from exc


def _xattr_failed(exc: OSError, name: str) -> OSError:
    """The error of an xattr that could not be set. ENOSPC there means no room for it in the
    inode's xattr space (a 60 KiB value on ext4), not a full disk: it fails this entry and the
    run goes on (as E2BIG, not among FATAL_ERRNOS; it stopped every run at that file)."""
    err = errno.E2BIG if exc.errno == errno.ENOSPC else exc.errno
    return OSError(err, f"setting xattr {name}: {exc.strerror}")


def put_xattrs(fd: int, xattrs: list[tuple[str, bytes]], what: str) -> None:
    for n, v in xattrs:
        try:
            os.setxattr(fd, n, v)
        except OSError as exc:
            if n.startswith(_PRIVILEGED_XATTR) and exc.errno in (
                errno.EPERM,
                errno.EACCES,
                errno.ENOTSUP,
                errno.EOPNOTSUPP,
                errno.EINVAL,
            ):
                continue
            raise _xattr_failed(exc, n) from exc


_GRANULARITY: dict[int, int] = {}  # st_dev -> time step in ns (time_granularity)
_PROBE_NS = 1_600_000_000_123_456_789  # a time with a digit in every place


def time_granularity(dir_fd: int) -> int:
    """The step, in ns, of the file times that the filesystem of directory `dir_fd` keeps: 1,
    or 10**k when it cuts them (whole seconds on ext4 with small inodes, 10 ms on exFAT).
    Found once per filesystem by setting a time on an unnamed file there and reading it back;
    1 when that cannot be done (then times compare exactly, as before)."""
    dev = os.fstat(dir_fd).st_dev
    g = _GRANULARITY.get(dev)
    if g is not None:
        return g
    g = 1
    try:
        land = Landing(dir_fd)
        try:
            os.utime(land.fd, ns=(_PROBE_NS, _PROBE_NS))
            got = os.fstat(land.fd).st_mtime_ns
        finally:
            land.abort()
        if got != _PROBE_NS:
            g = next((10**k for k in range(1, 10) if _PROBE_NS - _PROBE_NS % 10**k == got), 1)
    except OSError:
        pass
    _GRANULARITY[dev] = g
    return g


# --------------------------------------------------------------------------------------------
# Landing files atomically


class Landing:
    """A destination file being written: unnamed (O_TMPFILE) or under a temporary name until
    `commit` gives it its real name in one step. `abort` leaves nothing behind."""

    __slots__ = ("fd", "dir_fd", "tmp_name", "mode")

    def __init__(self, dir_fd: int, mode: int = 0o600) -> None:
        # Created with its final permission bits when the umask lets them through, so that
        # finish_meta needs no fchmod; never more open than 0o700 for the owner until then.
        # Owner read/write until finish_meta: an unprivileged process needs write permission to
        # set user.* xattrs on its own file.
        create = (mode & 0o777) | 0o600
        self.mode = create if not create & UMASK else 0o600
        self.dir_fd = dir_fd
        self.tmp_name: str | None = None
        self.fd = -1
        if O_TMPFILE and _tmpfile_ok[0]:
            try:
                self.fd = os.open(".", os.O_WRONLY | O_TMPFILE | os.O_CLOEXEC, self.mode, dir_fd=dir_fd)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise
                _tmpfile_ok[0] = False  # this filesystem cannot: named temporaries from now on
        self.tmp_name = new_tmp_name()
        self.fd = os.open(
            self.tmp_name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
            self.mode,
            dir_fd=dir_fd,
        )
        hold_tmp(self.fd)

    def finish_meta(
        self, m: Meta, xattrs: list[tuple[str, bytes]] | None, what: str, inherit_gid: bool = True,
        acl_inherited: bool = False,
    ) -> None:  # fmt: skip
        """Owner (as root), xattrs/ACLs, mode, times. `inherit_gid`: the directory may hand the
        new file another group (setgid directory), so the owner is always set. `acl_inherited`:
        the directory has a default ACL (has_default_acl): the file took an ACL of its own from
        it, and its mode from that ACL rather than the umask; the ACL goes unless the source's
        replaces it."""
        fd = self.fd
        if acl_inherited:
            drop_inherited_acls(fd, [n for n, _ in xattrs or ()])
        chowned = False
        if IS_ROOT and (inherit_gid or m.st_uid != EUID or m.st_gid != EGID):
            os.fchown(fd, m.st_uid, m.st_gid)  # before the xattrs: a chown drops security.capability
            chowned = True
        if xattrs:
            put_xattrs(fd, xattrs, what)
        mode = stat.S_IMODE(m.st_mode)
        # An ACL sets the group bits; chown clears set-id bits: re-apply the mode then.
        if mode != self.mode or chowned or xattrs or acl_inherited:
            os.fchmod(fd, mode)
        os.utime(fd, ns=(m.st_atime_ns, m.st_mtime_ns))

    def commit(self, name: str, replace: bool) -> None:
        """Give the file its real name. `replace`: a destination entry of that name may exist."""
        try:
            if self.tmp_name is None:
                if not replace:
                    try:
                        ffi.link_fd(self.fd, self.dir_fd, name)
                        return
                    except FileExistsError:
                        pass
                self.tmp_name = new_tmp_name()
                hold_tmp(self.fd)
                ffi.link_fd(self.fd, self.dir_fd, self.tmp_name)
            os.rename(self.tmp_name, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            self.tmp_name = None
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        self.close()
        if self.tmp_name is not None:
            try:
                os.unlink(self.tmp_name, dir_fd=self.dir_fd)
            except OSError:
                pass
            self.tmp_name = None


# Whether O_TMPFILE works where we write (one flag per process: a run writes to one filesystem).
_tmpfile_ok = [True]


def new_tmp_name() -> str:
    return f"{TMP_PREFIX}{os.urandom(8).hex()}{TMP_SUFFIX}"


def is_tmp_name(name: str) -> bool:
    return name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX) and len(name) == 26


STALE_OTHER = 10.0
"""Seconds after which a temporary that is not a regular file or directory is another run's leftover."""


def without_tmp(
    dir_fd: int, entries: list[tuple[str, os.stat_result]], dry_run: bool, held: list[str] | None = None
) -> dict[str, os.stat_result]:
    """A scanned destination directory's entries by name, without the temporaries of an
    interrupted run: those are ours to remove, without a line or a count (a dry run leaves
    them in place and does not list them either, so that `-n -v` names what the real run
    names: QA, it announced their deletion).
    A temporary directory (make_hidden_dir) or file (hold_tmp) still held by a live run is
    left to it, unlisted (and its name added to `held`). Another kind (a symlink, FIFO or link
    being renamed into place by _via_tmp: it cannot be locked) is, for a caller that takes
    `held` (a daemon's run, which removes what is still there at its end: DestTree._sweep),
    removed only once its inode has not changed for STALE_OTHER seconds: removing a live run's
    failed its rename (QA: concurrent pushes of hard-linked FIFOs, exit 3). A local run (no
    `held`) removes it at once: it would stay for good after a move emptied its source (QA)."""
    out = {}
    now = time.time()
    for name, m in entries:
        if is_tmp_name(name):
            if dry_run:
                continue
            try:
                if stat.S_ISDIR(m.st_mode) or stat.S_ISREG(m.st_mode):
                    if not remove_stale(dir_fd, name, stat.S_ISDIR(m.st_mode)) and held is not None:
                        held.append(name)
                elif held is not None and now - m.st_ctime < STALE_OTHER:
                    held.append(name)  # the caller removes it at its end if it is still there
                else:
                    os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass
            continue
        out[name] = m
    return out


def hold_tmp(fd: int) -> None:
    """Mark a file that has (or is about to get) a temporary name as a live run's: a shared
    flock, held until the fd closes. Another run's scan of the directory (without_tmp) leaves
    it alone; it removed it, failing the writer's rename (concurrent pushes into one tree)."""
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_SH)


def make_hidden_dir(parent_fd: int, acl_inherited: bool = False) -> tuple[str, int]:
    """A new directory under a temporary name (new_tmp_name), for a transfer to fill before it
    moves it into place (DestTree, R41). Returns (its name, an fd holding a shared flock on it
    until closed): another run's scan of the parent (without_tmp) leaves a held one alone and
    removes one whose run died. POSIX only (flock)."""
    import fcntl

    name = new_tmp_name()
    make_dir(parent_fd, name, acl_inherited)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        os.rmdir(name, dir_fd=parent_fd)
        raise
    return name, fd


def remove_stale(parent_fd: int, name: str, is_dir: bool) -> bool:
    """Remove a temporary file or directory left by a run that died, unless a live run holds
    it (a shared flock: make_hidden_dir, hold_tmp): False then."""
    import fcntl

    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if is_dir else os.O_NONBLOCK)
    fd = os.open(name, flags, dir_fd=parent_fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # being written, filled or renamed by a live run
        if is_dir:
            remove_tree(parent_fd, name)
        else:
            os.unlink(name, dir_fd=parent_fd)
        return True
    finally:
        os.close(fd)


def read_all(fd: int, size: int) -> bytes:
    """Read a whole small file listed at `size` bytes; one syscall when the size is right. A
    file that grew is read to its end; one that shrank raises OSError(EAGAIN, CHANGED_SIZE)
    (landing it would give the listed mtime to content the file never had at that size)."""
    data = os.read(fd, size + 1)
    if len(data) == size:
        return data
    parts = [data]
    while True:
        more = os.read(fd, max(size, 65536))
        if not more:
            break
        parts.append(more)
    out = b"".join(parts)
    if len(out) < size:
        raise OSError(errno.EAGAIN, CHANGED_SIZE)
    return out


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def land_data(
    dir_fd: int, name: str, data: bytes | memoryview, m: Meta, xattrs: list[tuple[str, bytes]] | None, replace: bool, inherit_gid: bool = True,
    acl_inherited: bool = False,
) -> None:  # fmt: skip
    """Land a small file whose whole content is in memory, with its metadata, atomically."""
    landing = Landing(dir_fd, stat.S_IMODE(m.st_mode))
    try:
        write_all(landing.fd, data)
        landing.finish_meta(m, xattrs, name, inherit_gid, acl_inherited)
        landing.commit(name, replace)
    except BaseException:
        landing.abort()
        raise


def copy_small(
    src_dir: int, name: str, dst_dir: int, dst_name: str, m: Meta, replace: bool, inherit_gid: bool = True,
    acl_inherited: bool = False,
) -> int:  # fmt: skip
    """Copy one small regular file with its metadata and land it atomically; returns bytes."""
    sfd = open_source(src_dir, name)
    try:
        xattrs = get_xattrs(sfd)
        landing = Landing(dst_dir, stat.S_IMODE(m.st_mode))
        try:
            if is_sparse(m):
                copy_sparse(sfd, landing.fd, m.st_size)
                n = m.st_size  # counted at its size, as every other copier counts it
            elif m.st_size:
                data = read_all(sfd, m.st_size)
                write_all(landing.fd, data)
                n = len(data)
            else:
                n = 0
            landing.finish_meta(m, xattrs, name, inherit_gid, acl_inherited)
            landing.commit(dst_name, replace)
        except BaseException:
            landing.abort()
            raise
    finally:
        os.close(sfd)
    return n


def copy_range(sfd: int, dfd: int, offset: int, length: int) -> int:
    """Copy up to `length` bytes at `offset` in the kernel where it can; returns bytes copied."""
    done = 0
    while done < length:
        try:
            n = ffi.copy_file_range(sfd, dfd, length - done, offset + done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                raise
            return done + _copy_range_rw(sfd, dfd, offset + done, length - done)
        if n == 0:
            break
        done += n
    return done


def _copy_range_rw(sfd: int, dfd: int, offset: int, length: int) -> int:
    done = 0
    while done < length:
        buf = os.pread(sfd, min(length - done, 8 << 20), offset + done)
        if not buf:
            break
        view = memoryview(buf)
        pos = offset + done
        while view:
            w = os.pwrite(dfd, view, pos)
            view = view[w:]
            pos += w
        done += len(buf)
    return done


def data_extents(sfd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data regions of a file, via SEEK_DATA/SEEK_HOLE."""
    out = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(sfd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(0, size)]
            raise
        end = os.lseek(sfd, start, os.SEEK_HOLE)
        out.append((start, end - start))
        pos = end
    return out


def copy_sparse(sfd: int, dfd: int, size: int) -> int:
    """Copy the data regions of a sparse file of `size` bytes, holes as holes. Raises
    OSError(EAGAIN, CHANGED_SIZE) when the file shrank meanwhile (its extents then stop short,
    and the rest would land as zeros it never held)."""
    n = 0
    for off, length in data_extents(sfd, size):
        n += _copy_range_rw(sfd, dfd, off, length)
    check_not_shrunk(sfd, size)
    os.ftruncate(dfd, size)
    return n


def check_not_shrunk(sfd: int, size: int) -> None:
    """After a sparse copy (where reads do not come up short at a new end of file): raise
    OSError(EAGAIN, CHANGED_SIZE) if the source is now smaller than the `size` listed."""
    if os.fstat(sfd).st_size < size:
        raise OSError(errno.EAGAIN, CHANGED_SIZE)


def _via_tmp(dst_dir: int, name: str, create: Callable[[str], None], finish: Callable[[str], None] | None = None) -> None:
    """Create an entry under a temporary name, finish its metadata, rename it over `name` in
    one step; on any failure the temporary is removed."""
    tmp = new_tmp_name()
    create(tmp)
    try:
        if finish is not None:
            finish(tmp)
        os.rename(tmp, name, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)
        # rename(2) does nothing when both names are links to one inode (`name` became the
        # same link meanwhile, another run's): the temporary would stay in the group (QA).
        try:
            os.unlink(tmp, dir_fd=dst_dir)
        except FileNotFoundError:
            pass
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dst_dir)
        except OSError:
            pass
        raise


def make_symlink(target: str, dst_dir: int, name: str, m: Meta, replace: bool, xattrs: dict[str, bytes] | None = None) -> None:
    """Create a symlink (never followed) with its times, owner and `xattrs` (the source's: on
    Linux only trusted.* and security.* ones, as root), atomically."""
    if not replace:
        try:
            os.symlink(target, name, dir_fd=dst_dir)
        except FileExistsError:
            pass
        else:
            try:
                _symlink_meta(dst_dir, name, m, xattrs)
            except BaseException:
                os.unlink(name, dir_fd=dst_dir)
                raise
            return
    _via_tmp(dst_dir, name, lambda t: os.symlink(target, t, dir_fd=dst_dir), lambda t: _symlink_meta(dst_dir, t, m, xattrs))


def _symlink_meta(dst_dir: int, name: str, m: Meta, xattrs: dict[str, bytes] | None = None) -> None:
    if xattrs:
        replace_xattrs(dst_dir, name, {}, xattrs)
    if IS_ROOT:
        os.chown(name, m.st_uid, m.st_gid, dir_fd=dst_dir, follow_symlinks=False)
    os.utime(name, ns=(m.st_atime_ns, m.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)


def make_special(
    dst_dir: int, name: str, m: Meta, replace: bool, acl_inherited: bool = False,
    xattrs: dict[str, bytes] | None = None,
) -> None:  # fmt: skip
    """Recreate a FIFO, socket or (as root) device node, atomically, with its metadata and
    `xattrs` (the source's, from xattrs_at: ACLs mostly). `acl_inherited`: as for
    Landing.finish_meta."""

    def finish(tmp: str) -> None:
        if acl_inherited or xattrs:
            path = _xattr_path(dst_dir, tmp)
            if acl_inherited:
                drop_inherited_acls(path, xattrs or ())
            if xattrs:
                replace_xattrs(dst_dir, tmp, xattrs_at(dst_dir, tmp), xattrs)
        if IS_ROOT:
            os.chown(tmp, m.st_uid, m.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        os.chmod(tmp, stat.S_IMODE(m.st_mode), dir_fd=dst_dir, follow_symlinks=False)
        os.utime(tmp, ns=(m.st_atime_ns, m.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)

    _via_tmp(dst_dir, name, lambda t: os.mknod(t, stat.S_IFMT(m.st_mode) | 0o600, m.st_rdev, dir_fd=dst_dir), finish)


def land_other(
    dst_dir: int, name: str, m: Meta, d: Any, target: str | None, xattrs: dict[str, bytes], acl_inherited: bool, dry: bool
) -> str | None:  # fmt: skip
    """The first name of a hard-linked symlink (`target`), FIFO, socket or device `m` at `name`,
    where `d` (a stat, or None) is: "symlink" or "special" when it is made (a dry run: would be),
    None when the one there is already it (its metadata and `xattrs` then made the source's).
    Its other names are linked to it (make_hardlink)."""
    kind = stat.S_IFMT(m.st_mode)
    if kind in (stat.S_IFCHR, stat.S_IFBLK) and not IS_ROOT:
        raise OSError(errno.EPERM, "device nodes are recreated only as root")
    if d is not None and stat.S_IFMT(d.st_mode) == kind:
        if kind == stat.S_IFLNK:
            same = os.readlink(name, dir_fd=dst_dir) == target
        else:
            same = d.st_rdev == m.st_rdev
        if same:
            if not dry:
                acl = replace_xattrs(dst_dir, name, xattrs_at(dst_dir, name), xattrs)
                fix_meta(dst_dir, name, m, meta_of(d), acl)
            return None
    if not dry:
        if target is not None:
            make_symlink(target, dst_dir, name, m, d is not None, xattrs or None)
        else:
            make_special(dst_dir, name, m, d is not None, acl_inherited, xattrs or None)
    return "symlink" if kind == stat.S_IFLNK else "special"


def make_hardlink(dst_dir: int, name: str, first_dir: int, first_name: str, replace: bool) -> None:
    """Make `name` another link to the already-landed `first_name`, atomically."""

    def link(to: str) -> None:
        os.link(first_name, to, src_dir_fd=first_dir, dst_dir_fd=dst_dir, follow_symlinks=False)

    if not replace:
        try:
            link(name)
            return
        except FileExistsError:
            pass
    _via_tmp(dst_dir, name, link)


SAME_FILE = "source and destination are the same file (another path to it: a bind mount, a hard link); kept"
"""Move: why an up-to-date source entry that is its own destination is not removed."""

INTO_ITSELF = "it is the destination, by another path (a bind mount): not copied into itself"
"""Why a source directory that is the directory the run lands in is left out (R52)."""


def into_itself(entries: Iterable[tuple[str, Meta | os.stat_result]], top: tuple[int, int]) -> list[str]:
    """The names among a source directory's `entries` that are the directory the run lands in
    (`top`, by device and inode): the destination is a bind mount of a directory inside the
    source. A walk that went in would copy its own output until the disk is full (R52)."""
    return [name for name, m in entries if (m.st_dev, m.st_ino) == top and stat.S_ISDIR(m.st_mode)]


@functools.cache
def machine_id() -> bytes:
    """This machine as it runs now (the kernel's boot id), b"" where there is none: two
    (device, inode) pairs name the same file only on the same machine (decisions R51)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()[:64]
    except OSError:
        return b""


def this_machine(machine: bytes) -> bool:
    """Whether a peer's `machine_id` is this machine's (never for an unknown one, b"")."""
    return bool(machine) and machine == machine_id()


def same_inode(a: os.stat_result | Meta | None, b: os.stat_result | Meta | None) -> bool:
    """Whether two stat results name one file (the same device and inode): a bind mount or a
    hard link of it reached by another path; False when either is missing."""
    return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def reaches(target: bytes, ident: tuple[int, int]) -> str | None:
    """Where the directory `ident` (device, inode) stands to the path `target`: "same" when
    `target` is that directory, "inside" when one of its existing ancestors is (the target
    lies in it: a copy there would chase its own output), else None. By identity, not by
    name: a bind mount is another path to the same directory (decisions R51, R52). The walk
    goes up the real path (symlinks, `..` and a relative start resolved), as the kernel would."""
    path = os.path.realpath(target)
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and (st.st_dev, st.st_ino) == ident:
        return "same"
    up = ancestors(path)
    return "inside" if ident in zip(up[::2], up[1::2]) else None


def kernel_abspath(path: bytes) -> bytes:
    """`path` made absolute as the kernel reads it: a `..` is the parent of what the path before
    it names (after a symlink, of its target), not the previous name struck out as
    os.path.abspath does (`src/lnk/..` with lnk -> ../other/inner is other, as cp and ls see it).
    Without `..` it is os.path.abspath.
    Raises OSError (ENOENT, ENOTDIR) when what a `..` follows is missing or no directory, as
    the kernel does: `missing/..` is no path (os.path.realpath would make it the parent)."""
    parts = path.split(b"/")
    if b".." not in parts:
        return os.path.abspath(path)
    last = len(parts) - 1 - parts[::-1].index(b"..")
    head = b"/".join(parts[: last + 1])
    os.stat(head)  # the kernel's reading of every `..` in it, or its error
    base = os.path.realpath(head)
    rest = b"/".join(parts[last + 1 :])
    return os.path.abspath(os.path.join(base, rest)) if rest.strip(b"/") else base


def source_unreadable(name: bytes, st_mode: int, *, dir_fd: int | None = None, follow: bool = False) -> str:
    """Why a transfer's source root `name` (relative to `dir_fd`, or a path) of type `st_mode`
    cannot be read, as strerror: a directory that cannot be opened or searched (its first
    entry's lstat), a regular file that cannot be opened. "" when it can, and for any other
    kind (never opened here). `follow`: a symlink to a directory is opened (`SRC/`)."""
    nofollow = 0 if follow else os.O_NOFOLLOW
    try:
        if stat.S_ISDIR(st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | nofollow, dir_fd=dir_fd)
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        try:
                            e.stat(follow_symlinks=False)  # search (x) permission
                        except FileNotFoundError:
                            continue  # gone meanwhile (an atomic save's temporary): the next (QA)
                        break
            finally:
                os.close(fd)
        elif stat.S_ISREG(st_mode):
            os.close(os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd))
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


def ancestors(path: bytes) -> list[int]:
    """The (device, inode) of each existing directory above `path`'s real path, its parent's
    first, up to `/`, flat: where a copy into `path` would be inside it (reaches), and what a
    mirror on this machine must not have as its destination, which would hold the source
    (decisions R59)."""
    out: list[int] = []
    path = os.path.realpath(path)
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
        try:
            st = os.stat(path)
        except OSError:
            continue
        out += [st.st_dev, st.st_ino]
    return out


def holds(target: bytes, up: list[int]) -> bool:
    """Whether the directory `target` is one of the ancestors `up` (ancestors()) lists."""
    try:
        st = os.stat(target)
    except OSError:
        return False
    pairs = set(zip(up[::2], up[1::2]))
    return stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in pairs


_CAPABILITY = "security.capability"


def _capability(dir_fd: int, name: str) -> bytes | None:
    """A regular file's file capabilities (the xattr), None when it has none."""
    try:
        return os.getxattr(_xattr_path(dir_fd, name), _CAPABILITY, follow_symlinks=False)
    except OSError:
        return None


def fix_meta(dst_dir: int, name: str, src: Meta, dst: Meta, force_mode: bool = False) -> bool:
    """Bring mode/owner/times of an up-to-date destination entry in line; True if changed.
    `force_mode`: its ACL was just rewritten, which may have changed the group bits."""
    changed = force_mode
    is_link = stat.S_ISLNK(src.st_mode)
    if IS_ROOT and (src.st_uid != dst.st_uid or src.st_gid != dst.st_gid):
        # The kernel drops a file's capabilities on chown; the xattrs were synced before this
        # call, so what it holds now is the source's: put it back (rsync -aX keeps them).
        cap = _capability(dst_dir, name) if stat.S_ISREG(src.st_mode) else None
        os.chown(name, src.st_uid, src.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        if cap is not None:
            os.setxattr(_xattr_path(dst_dir, name), _CAPABILITY, cap, follow_symlinks=False)
        changed = True
    if not is_link and (stat.S_IMODE(src.st_mode) != stat.S_IMODE(dst.st_mode) or changed):
        chmod_at(dst_dir, name, stat.S_IMODE(src.st_mode))
        changed = True
    if src.st_mtime_ns != dst.st_mtime_ns:
        os.utime(name, ns=(src.st_atime_ns, src.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)
        changed = True
    return changed


def file_hash(dir_fd: int, name: str, stop: Callable[[], bool] | None = None) -> bytes:
    """xxh3-128 of a regular file's content (for --checksum). Never follows a link or waits on
    a FIFO; `stop`, checked between 4 MiB reads, abandons the file (InterruptedError)."""
    import xxhash

    h = xxhash.xxh3_128()
    fd = open_source(dir_fd, name)
    try:
        while True:
            buf = os.read(fd, 4 << 20)
            if not buf:
                break
            h.update(buf)
            if stop is not None and stop():
                raise InterruptedError(errno.EINTR, "stopped")
    finally:
        os.close(fd)
    return h.digest()
