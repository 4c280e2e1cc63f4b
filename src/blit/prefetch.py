"""Compare an up-to-date tree while the interpreter is still importing trio and typer.

`blit copy|mirror SRC/ DST/` spends its first ~0.13 s importing. The C comparer
(blit.ffi.scan) releases the GIL, so a thread started by the entry point can compare directory
pairs on the other core meanwhile; the local workers then take those results (`take`) instead of
comparing the same pair again. It is an earlier scan of the same directories, nothing more: a
result is used only by the job for the exact pair of directories it was computed for, and only
once; the walk stops as soon as the first job asks.

It must not change anything on disk, import anything heavy, or guess: it starts only for the
plainest command lines (`sniff`: a local copy or mirror with no option that changes what is
compared or filtered), and anything it cannot answer is left to the workers.
"""

from __future__ import annotations

import os
import stat
import sys
TYPE_CHECKING = False  # not `import typing`: it costs start-up time in every process
if TYPE_CHECKING:
    from typing import Any

MAX_DIRS = 4096  # never more results held than this (clean directories are a few bytes each)
_FLAGS_OK = frozenset({"-q", "--quiet", "-v", "--verbose", "--progress", "--json", "--dry-run", "-n"})
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_results: dict[tuple[str, str], Any] = {}
_stop = False
ACTIVE = False
_cv: Any = None  # threading.Condition, made by `start`: guards _results and _inflight
_inflight: tuple[str, str] | None = None
"""The pair being compared now: `take` waits for it rather than compare it a second time (a
200,000-entry directory takes the comparer about a second)."""


def sniff(argv: list[str]) -> tuple[str, str] | None:
    """The (source dir, destination dir) pair of `blit copy|mirror SRC DST` when both exist
    locally as directories and nothing on the line changes what is compared; else None."""
    if len(argv) < 3 or argv[0] not in ("copy", "mirror"):
        return None
    paths = []
    for a in argv[1:]:
        if a.startswith("-"):
            if a not in _FLAGS_OK:
                return None
        else:
            paths.append(a)
    if len(paths) != 2:
        return None
    src, dst = paths
    if ":" in src.split("/", 1)[0] or ":" in dst.split("/", 1)[0] or "\0" in src + dst:
        return None  # possibly remote (host:/path); the real parser decides
    try:
        s_abs, d_abs = os.path.abspath(src), os.path.abspath(dst)
        if not stat.S_ISDIR(os.stat(d_abs).st_mode):
            return None
        if src.endswith("/"):
            return (s_abs, d_abs) if stat.S_ISDIR(os.stat(s_abs).st_mode) else None
        if not stat.S_ISDIR(os.lstat(s_abs).st_mode):
            return None
        name = os.path.basename(s_abs)
        if not name or not stat.S_ISDIR(os.lstat(os.path.join(d_abs, name)).st_mode):
            return None
        return s_abs, os.path.join(d_abs, name)
    except (OSError, ValueError):
        return None


def start(argv: list[str]) -> None:
    """Called by the entry point before the heavy imports."""
    global ACTIVE
    if sys.platform != "linux":
        return
    pair = sniff(argv)
    if pair is None:
        return
    import threading  # only now: every other command starts without it

    global _cv
    _cv = threading.Condition()
    ACTIVE = True
    threading.Thread(target=_walk, args=pair, name="blit-prefetch", daemon=True).start()


def take(src_dir: str, dst_dir: str) -> Any:
    """The comparer's result for this exact pair of directories (absolute paths as the worker
    joins them), or None; waits for it if it is being compared now. The first call stops the
    walk."""
    global _stop
    key = (src_dir, dst_dir)
    with _cv:
        _stop = True
        while _inflight == key:
            _cv.wait()
        return _results.pop(key, None)


def _walk(src: str, dst: str) -> None:
    try:
        from .ffi import scan

        if not scan.HAVE_CMPDIR:
            return
        flags = scan.CMP_FLAGS
        sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            dfd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _pair(scan, flags, src, dst, sfd, dfd, 0)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    except OSError:
        pass  # the workers will meet (and report) whatever stopped us


def _pair(scan: Any, flags: int, src: str, dst: str, sfd: int, dfd: int, depth: int) -> None:
    global _inflight
    with _cv:
        if _stop or len(_results) >= MAX_DIRS:
            return
        _inflight = (src, dst)
    got = None
    try:
        got = scan.cmpdir(sfd, dfd, flags)
    finally:
        with _cv:
            if got is not None:
                _results[(src, dst)] = got
            _inflight = None
            _cv.notify_all()
    if got is None:
        return
    if got[2] != got[3]:
        # Extras or temporaries: the worker lists those names itself (worker._dest_only); below
        # this directory, it compares itself.
        return
    if depth >= 64:
        return
    for name, m, d in sorted(got[4], reverse=True):  # the coordinator's queue is LIFO: last first
        if d is None or not (stat.S_ISDIR(m.st_mode) and stat.S_ISDIR(d.st_mode)):
            continue
        if _stop:
            return
        try:
            cs = os.open(name, _O_DIR, dir_fd=sfd)
        except OSError:
            continue
        try:
            cd = os.open(name, _O_DIR, dir_fd=dfd)
        except OSError:
            os.close(cs)
            continue
        try:
            _pair(scan, flags, f"{src.rstrip('/')}/{name}", f"{dst.rstrip('/')}/{name}", cs, cd, depth + 1)
        finally:
            os.close(cs)
            os.close(cd)
