"""Run a local transfer: the nursery tree that scans, plans and lands a tree a directory at a time.

Directory jobs (worker.Worker.run: scan both sides, plan, land the small entries) run in worker
threads, and once the tree proves large, in worker processes, so the per-file Python path uses
every core. This coordinator owns what is global: the queue of directories (LIFO, so memory
follows the depth of the tree, not its size), large files copied in multi-MiB chunks under a
StallGuard, hard-link groups, directory metadata applied once a directory's subtree is done,
mirror deletions (only after the whole source was read), and the counters.

This module must not print or parse arguments; it reports through report.Progress.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import pickle
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from . import ffi, fsops
from .errors import FATAL_ERRNOS, FatalError, StallError, leaves
from .fsops import Meta
from .plan import Op, up_to_date
from .report import Failure, NullProgress, Progress, Summary, nothing_deleted, tick
from .stall import StallGuard, Timeouts, run_stoppable
from .worker import DirJob, DirResult, RunSpec, StopFlag, Worker, frame

CHUNK = 32 << 20  # bytes per thread hop when copying a large file
T = TypeVar("T")
LINK_COPIES = 32  # hard-link groups whose first member copies at once (trio's thread limit is 40)
LINK_SMALL = 1 << 20  # a first member up to this size is copied in one call (a batch of them per thread hop)
HOP_BATCH = 256  # hard-link members made per thread hop (R63)
LINK_DIRS_OPEN = 4  # first members' directories a link hop keeps open (besides its own)
_Member = tuple[str, str, Meta, "Meta | None", Op]
"""A hard-link member for `_links_of_dir`: name, dname, source, destination (None), and what
it is: a first member to copy (COPY) or found up to date (SAME), or one to link (HARDLINK)."""


class Planner:
    """The heuristics: how many workers, when to use processes. No user knobs."""

    def __init__(self) -> None:
        self.cpus = max(1, os.cpu_count() or 1)
        self.thread_jobs = 4  # concurrent directory jobs in threads (syscalls release the GIL)
        self.procs = max(2, self.cpus)
        self.jobs_per_proc = 2  # one in hand, one queued: a worker never waits on the coordinator
        self.big_jobs = max(2, self.cpus)
        # Worker processes cost ~50 ms of CPU each to start; they pay off only where the GIL
        # holds threads back: when the directories already queued would take this much longer
        # in threads than in processes (projected from the CPU of the jobs done so far). For work
        # all in Python this is the earlier rule (queued CPU > 0.25 s); the C copier and
        # comparer release the GIL, so plain small files and up-to-date trees stay in threads.
        self.proc_payoff_s = 0.125

    def want_processes(self, jobs_done: int, gil_seconds: float, free_seconds: float, queued: int) -> bool:
        """gil_seconds: thread CPU the jobs done so far spent in Python (holding the GIL);
        free_seconds: their CPU in the C calls that release it (blit.ffi.scan)."""
        if jobs_done < 2 or queued < 2 or self.cpus < 2:
            return False
        scale = queued / jobs_done
        gil, free = gil_seconds * scale, free_seconds * scale
        in_procs = (gil + free) / min(self.cpus, self.procs)
        in_threads = max(gil, (gil + free) / min(self.cpus, self.thread_jobs))
        return in_threads - in_procs > self.proc_payoff_s


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


class Node:
    """A destination directory whose metadata is applied once everything below it is done."""

    __slots__ = ("parent", "src_rel", "dst_rel", "meta", "dst_meta", "new", "pending", "changed", "own", "acl")

    def __init__(
        self,
        parent: Node | None,
        src_rel: str,
        dst_rel: str,
        meta: Meta | None,
        dst_meta: Meta | None,
        new: bool,
        own: bool = True,
    ) -> None:
        self.parent = parent
        self.src_rel = src_rel
        self.dst_rel = dst_rel
        self.meta = meta
        self.dst_meta = dst_meta
        self.new = new
        self.pending = 1
        self.changed = False
        self.own = own  # False: the parent of the top entry, not part of the transfer
        self.acl = False  # it has a default ACL: files landed in it drop what they inherit


# ------------------------------------------------------------------------------------------------
# Executors: where directory jobs run.


class ThreadExecutor:
    def __init__(self, worker: Worker, limit: int) -> None:
        self.worker = worker
        self.limiter = trio.CapacityLimiter(limit)
        self.running = 0
        self._lock = threading.Lock()

    def _call(self, job: DirJob) -> DirResult:
        with self._lock:
            self.running += 1
        try:
            t = time.thread_time()
            res = self.worker.run(job)
            res.cpu_seconds = time.thread_time() - t
            return res
        finally:
            with self._lock:
                self.running -= 1

    async def run(self, job: DirJob) -> DirResult:
        # Abandoned on cancel: a stalled job is given up on (its thread may be stuck in a hung
        # syscall); on interrupt the coordinator sets the stop flag and the thread returns after
        # the file in hand (wait_idle).
        return await trio.to_thread.run_sync(self._call, job, limiter=self.limiter, abandon_on_cancel=True)

    def wait_idle(self, seconds: float) -> None:
        """Give abandoned threads a moment to finish the file in hand (called at shutdown)."""
        end = time.monotonic() + seconds
        while self.running and time.monotonic() < end:
            time.sleep(0.005)


class _Proc:
    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.waiters: deque[list[Any]] = deque()
        self.buf = bytearray()
        self.send_lock = trio.Lock()

    async def read_frame(self) -> bytes | None:
        stream = self.proc.stdout
        assert stream is not None
        while True:
            if len(self.buf) >= 4:
                n = int.from_bytes(self.buf[:4], "big")
                if len(self.buf) >= 4 + n:
                    body = bytes(self.buf[4 : 4 + n])
                    del self.buf[: 4 + n]
                    return body
            data = await stream.receive_some(1 << 20)
            if not data:
                return None
            self.buf += data


class ProcessExecutor:
    """Worker processes (`python -m blit.worker`) fed framed pickles over pipes."""

    def __init__(self, spec: RunSpec, count: int, per_proc: int) -> None:
        self.spec = spec
        self.count = count
        self.per_proc = per_proc
        self.procs: list[_Proc] = []
        self.ready = False
        self.slots = trio.Semaphore(count * per_proc)

    async def start(self, nursery: trio.Nursery) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        spec_frame = frame(self.spec)
        for _ in range(self.count):
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", "from blit.worker import process_main; process_main()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                start_new_session=False,
            )
            p = _Proc(proc)
            assert proc.stdin is not None
            await proc.stdin.send_all(spec_frame)
            self.procs.append(p)
        for p in self.procs:
            hello = await p.read_frame()
            if hello is None:
                raise FatalError("a worker process failed to start")
            nursery.start_soon(self._reader, p)
        self.ready = True

    async def _reader(self, p: _Proc) -> None:
        while True:
            body = await p.read_frame()
            if body is None:
                while p.waiters:
                    w = p.waiters.popleft()
                    w[1] = None
                    w[0].set()
                return
            w = p.waiters.popleft()
            if not w[2]:
                w[1] = pickle.loads(body)
                w[0].set()

    async def run(self, job: DirJob) -> DirResult:
        async with self.slots:
            p = min(self.procs, key=lambda q: len(q.waiters))
            w: list[Any] = [trio.Event(), None, False]
            async with p.send_lock:
                p.waiters.append(w)
                assert p.proc.stdin is not None
                await p.proc.stdin.send_all(frame(job))
            try:
                await w[0].wait()
            except trio.Cancelled:
                w[2] = True  # stalled or interrupted: its answer, if it ever comes, is dropped
                raise
            if w[1] is None:
                raise FatalError("a worker process died")
            res: DirResult = w[1]
            return res

    async def aclose(self, interrupt: bool) -> None:
        with trio.CancelScope(shield=True):
            for p in self.procs:
                if interrupt:
                    try:
                        p.proc.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                try:
                    assert p.proc.stdin is not None
                    await p.proc.stdin.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            with trio.move_on_after(2):
                for p in self.procs:
                    await p.proc.wait()
            for p in self.procs:
                if p.proc.returncode is None:
                    p.proc.kill()
                    await p.proc.wait()


# ------------------------------------------------------------------------------------------------


class _Results:
    """A batch call's results so far, per item in order (a worker thread appends them), and
    whether its caller stopped waiting (a hung disk): the thread then makes no more."""

    def __init__(self) -> None:
        self.done: list[Any] = []
        self.stopped = False

    def stop(self, n: int, exc: StallError) -> list[Any]:
        """Give up: the results of the items done, then a stall failure for each of the rest
        of the `n`."""
        self.stopped = True
        done = list(self.done)
        return done + [OSError(errno.ETIMEDOUT, str(exc))] * (n - len(done))


class _Batcher:
    """Blocking calls of many tasks (each a directory's batch of hard-link members) run together
    in one worker-thread hop, one hop at a time: a hop per directory kept threads handing the
    GIL to each other (QA: 5,000 groups over 500 directories, 2.4-2.6 s against rsync -aH's
    0.5-0.6 s; 712,000 futex calls). Each call runs even if its caller was cancelled meanwhile
    (the calls are short); its result or what it raised goes back to its caller. A hop with no
    call done for `stall` seconds (a hung disk) is left to its thread, which stops after the
    call under way, and its calls not done fail with StallError."""

    CALLS = 64  # calls per hop at most

    def __init__(self, nursery: trio.Nursery, stall: float) -> None:
        self.stall = stall
        self._send, self._recv = trio.open_memory_channel[tuple[Callable[[], Any], list[Any], trio.Event]](math.inf)
        nursery.start_soon(self._worker)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        box: list[Any] = []
        done = trio.Event()
        self._send.send_nowait((functools.partial(fn, *args), box, done))
        await done.wait()
        ok, value = box[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    async def _worker(self) -> None:
        async for item in self._recv:
            batch = [item]
            while len(batch) < self.CALLS:
                try:
                    batch.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            guard = StallGuard("hard links", self.stall)
            stopped = threading.Event()

            def run_all() -> list[tuple[bool, Any]]:
                out: list[tuple[bool, Any]] = []
                for fn, _box, _done in batch:
                    if stopped.is_set():
                        break
                    try:
                        out.append((True, fn()))
                    except Exception as exc:  # noqa: BLE001 (handed to its caller)
                        out.append((False, exc))
                    try:
                        trio.from_thread.run_sync(guard.progress)
                    except trio.RunFinishedError:
                        break
                return out

            results: list[tuple[bool, Any]] = []
            why: Exception = OSError(errno.ECANCELED, "the run stopped")
            try:
                with guard:
                    results = await trio.to_thread.run_sync(run_all, abandon_on_cancel=True)
            except StallError as exc:
                why = exc
            finally:
                stopped.set()
                for i, (_, box, done) in enumerate(batch):
                    box.append(results[i] if i < len(results) else (False, why))
                    done.set()


def _release_fds(landing: fsops.Landing, *fds: int) -> None:
    """An abandoned large-file copy's descriptors and unfinished temporary, let go by the
    thread that still used them when its caller was cancelled."""
    try:
        landing.abort()
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


class LocalTransfer:
    """One run. `await run(top_job, top_node)` fills `summary`."""

    def __init__(
        self,
        spec: RunSpec,
        summary: Summary,
        progress: Progress | None = None,
        timeouts: Timeouts = Timeouts(),
        planner: Planner | None = None,
    ) -> None:
        self.spec = spec
        self.summary = summary
        self.progress: Progress = progress or NullProgress()
        self.timeouts = timeouts
        self.planner = planner or Planner()
        self.stop = StopFlag()
        self.worker = Worker(spec, self.stop)
        self.threads = ThreadExecutor(self.worker, self.planner.thread_jobs)
        self.procs: ProcessExecutor | None = None
        self.queue: list[tuple[DirJob, Node]] = []
        self.in_flight = 0
        self.thread_jobs_done = 0
        self.thread_gil_seconds = 0.0  # thread jobs' CPU in Python
        self.thread_free_seconds = 0.0  # and in C calls without the GIL
        self.finished = False
        self._wake = trio.Event()
        self.scan_incomplete: list[str] = []
        self.dst_unread = 0
        """Destination directories that could not be opened or scanned (a mirror deletes nothing)."""
        self.deletions: list[tuple[str, list[tuple[str, bool]], Meta | None]] = []
        self.inodes: dict[tuple[int, int], Any] = {}
        # Move: landed hard-link members, by source directory: (destination directory, names).
        self.link_sources: dict[str, tuple[str, list[tuple[str, Meta]]]] = {}
        self.big_limiter = trio.CapacityLimiter(self.planner.big_jobs)
        self.link_limiter = trio.CapacityLimiter(LINK_COPIES)
        """First members of hard-link groups being copied at once (each holds three fds while it
        copies: 20,000 groups at once ran out of file descriptors, QA)."""
        self._batcher: _Batcher | None = None
        self.bytes_done = 0
        self.files_done = 0
        self.files_planned = 0
        """Entries the planned directories hold (files_done's unit), and bytes_planned the
        bytes their copies move: the run's totals once every directory is planned (`_totals`)."""
        self.bytes_planned = 0
        self._planned_groups: set[tuple[int, int]] = set()
        self._fin_send, self._fin_recv = trio.open_memory_channel[Node | None](math.inf)
        self._fin_done = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- bookkeeping --------------------------------------------------------------------------

    def _fail(self, path: str, op: str, message: str) -> None:
        f = Failure(path, op, message)
        self.summary.failures.append(f)
        self.progress.error(f)

    def _fatal(self, message: str) -> None:
        if not self.summary.fatal:
            self.summary.fatal = message
        self.stop.is_set = True
        raise FatalError(message)

    def _poke(self) -> None:
        self._wake.set()
        self._wake = trio.Event()

    def _release(self, node: Node | None) -> None:
        while node is not None:
            node.pending -= 1
            if node.pending:
                return
            self._fin_send.send_nowait(node)
            node = node.parent

    # -- main ---------------------------------------------------------------------------------

    async def run(self, top_job: DirJob, top_node: Node) -> Summary:
        self.t0 = time.perf_counter()
        self.queue.append((top_job, top_node))
        try:
            await self._transfer()
            await self._remove_link_sources()  # only now: after every source directory was read
            await self._delete_extras()  # only now: after every source directory was read
        finally:
            self.worker.close()
            self.summary.duration_s = time.perf_counter() - self.t0
        self.summary.strategy = (
            f"processes:{self.procs.count}" if self.procs else f"threads:{self.planner.thread_jobs}"
        )
        return self.summary

    async def _transfer(self) -> None:
        try:
            async with trio.open_nursery() as outer:
                self._nursery = outer
                outer.start_soon(self._finalizer)
                if not isinstance(self.progress, NullProgress):
                    outer.start_soon(self._ticker)
                async with trio.open_nursery() as work:
                    self._work = work
                    for _ in range(self.planner.thread_jobs):
                        work.start_soon(self._dir_worker)
                self._fin_send.send_nowait(None)
                await self._fin_done.wait()
                outer.cancel_scope.cancel()  # the ticker and the worker-process readers
        except BaseException as exc:
            self.stop.is_set = True
            errs = leaves(exc)
            if all(isinstance(e, FatalError) for e in errs):
                if self.summary.fatal:
                    raise FatalError(self.summary.fatal) from None
                raise errs[0] from None  # raised by another part (a closed stdout)
            raise
        finally:
            if self.procs is not None:
                await self.procs.aclose(interrupt=self.stop.is_set)
            self.threads.wait_idle(1.0)

    async def _ticker(self) -> None:
        await tick(self.progress, lambda: (self.files_done, self.bytes_done), self.t0, self._totals)

    def _totals(self) -> tuple[int, int] | None:
        """(entries, bytes) of the whole run, once no directory is left to plan (for an ETA)."""
        if not self.finished:
            return None
        return max(self.files_planned, self.files_done), max(self.bytes_planned, self.bytes_done)

    # -- directory jobs -----------------------------------------------------------------------

    async def _next_job(self) -> tuple[DirJob, Node] | None:
        while not self.queue:
            if self.finished:
                return None
            await self._wake.wait()
        return self.queue.pop()

    async def _dir_worker(self) -> None:
        while True:
            item = await self._next_job()
            if item is None:
                return
            job, node = item
            self.in_flight += 1
            try:
                ex = self.procs if (self.procs is not None and self.procs.ready) else self.threads
                try:
                    with StallGuard(f"directory {job.rel or '.'}", self.timeouts.stall):
                        res = await ex.run(job)
                    if ex is self.threads and not res.prefetched:  # prefetched: its cost was paid earlier
                        self.thread_jobs_done += 1
                        self.thread_gil_seconds += max(0.0, res.cpu_seconds - res.c_seconds)
                        self.thread_free_seconds += res.c_seconds
                except StallError as exc:
                    # Reported, never waited on forever; nothing below it is trusted for deletion.
                    self._fail(job.rel or ".", "stall", str(exc))
                    self.scan_incomplete.append(job.rel or ".")
                    self._release(node)
                else:
                    self._handle(res, job, node)
            finally:
                self.in_flight -= 1
                if not self.queue and self.in_flight == 0:
                    self.finished = True
                self._poke()
            if (
                self.procs is None
                and not self.spec.dry_run
                and self.planner.want_processes(
                    self.thread_jobs_done, self.thread_gil_seconds, self.thread_free_seconds, len(self.queue)
                )
            ):
                self.procs = ProcessExecutor(self.spec, self.planner.procs, self.planner.jobs_per_proc)
                assert self._nursery is not None
                self._nursery.start_soon(self._start_procs)

    async def _start_procs(self) -> None:
        assert self.procs is not None and self._nursery is not None
        await self.procs.start(self._nursery)
        # More directory jobs can now be in flight at once.
        for _ in range(self.procs.count * self.procs.per_proc):
            if self.finished:
                break
            self._work.start_soon(self._dir_worker)

    def _handle(self, res: DirResult, job: DirJob, node: Node) -> None:
        s = self.summary
        s.files_copied += res.files_copied
        s.bytes_copied += res.bytes_copied
        s.files_skipped += res.files_skipped
        s.dirs_created += res.dirs_created
        s.links_created += res.links_created
        s.entries_seen += res.entries_seen
        s.files_removed += res.files_removed
        s.files_deleted += res.files_deleted
        self.files_done += res.files_copied + res.files_skipped + res.links_created
        self.bytes_done += res.bytes_copied
        self.files_planned += res.files_copied + res.files_skipped + res.links_created + len(res.big) + len(res.links)
        self.bytes_planned += res.bytes_copied + sum(b[2].st_size for b in res.big)
        for _, _, m, d in res.links:  # a group's data is copied once, unless it is up to date
            if (
                stat.S_ISREG(m.st_mode)
                and (m.st_dev, m.st_ino) not in self._planned_groups
                and (d is None or up_to_date(m, d, self.spec.compare) is Op.COPY)
            ):
                self._planned_groups.add((m.st_dev, m.st_ino))
                self.bytes_planned += m.st_size
        for action, path in res.actions:
            self.progress.action(action, path)
        for path, op, msg in res.failures:
            self._fail(path, op, msg)
        if res.fatal:
            self._fatal(res.fatal)
        if res.scan_error is not None:
            op, msg = res.scan_error
            if job.rel == "" and node.parent is None:
                self._fatal(f"cannot read source directory: {msg}")
            self._fail(job.rel or ".", op, msg)
            self.scan_incomplete.append(job.rel or ".")
        if res.incomplete:
            self.scan_incomplete.append(job.rel or ".")
        if res.dst_unread:  # what it holds is unknown: a mirror deletes nothing (as remotely)
            self.dst_unread += 1
        if res.scan_error is not None or res.incomplete or res.dst_unread:
            # Its contents did not all come: the destination directory keeps its metadata (one
            # we made stays 0o700), so a mode that locks the source (0, r--) does not lock the
            # rerun out of the copy; the run that reads it whole applies it.
            node.meta = None
        if res.changed:
            node.changed = True
        node.acl = res.acl_inherited
        if res.extras:
            self.deletions.append((job.dst_rel, res.extras, node.meta if node.own else None))
        for name, dname, m, new, dm in res.subdirs:
            child = Node(node, _join(job.rel, name), _join(job.dst_rel, dname), m, dm, new)
            node.pending += 1
            # mkdir in a setgid directory makes a setgid directory of its group: one we created
            # hands out what its parent hands out until it is finalised (bottom-up, after its files).
            inherit = job.inherit_gid if new else (dm is None or bool(dm.st_mode & stat.S_ISGID))
            self.queue.append((DirJob(child.src_rel, child.dst_rel, new, inherit_gid=inherit, dst_top=res.dst_top or job.dst_top), child))
        for name, dname, m, replace in res.big:
            node.pending += 1
            self._work.start_soon(self._big_file, node, job, name, dname, m, replace)
        # Which member of a group is copied (the others are linked to it) is decided here, in
        # name order with an up-to-date member first, not by which task trio runs first: a dry
        # run and the real run (and two runs) then name the same members.
        batch: list[_Member] = []
        for name, dname, m, d in sorted(res.links, key=_link_order):
            key = (m.st_dev, m.st_ino)
            first = key not in self.inodes
            if first:
                self.inodes[key] = trio.Event()
            how = self._first_op(m, d) if first else Op.HARDLINK
            if how is not None:
                batch.append((name, dname, m, d, how))
                continue
            node.pending += 1
            self._work.start_soon(self._hardlink, node, job, name, dname, m, d, first)
        if batch:
            node.pending += 1
            self._work.start_soon(self._links_of_dir, node, job, batch)
        self._release(node)

    # -- large files --------------------------------------------------------------------------

    async def _big_file(self, node: Node, job: DirJob, name: str, dname: str, m: Meta, replace: bool) -> None:
        path = _join(job.rel, name)
        try:
            async with self.big_limiter:
                await self._copy_big(job, name, dname, m, replace, path, node.acl)
            node.changed = True
            if self.spec.move:
                await self._remove_source(job.rel, job.dst_rel, name, m)
        except StallError as exc:
            self._fail(path, "copy", str(exc))
        except OSError as exc:
            if exc.errno in FATAL_ERRNOS:  # one line, naming the file, as push and pull say it
                self._fatal(f"{exc.strerror} (writing {_join(job.dst_rel, dname)})")
            self._fail(path, "copy", exc.strerror or str(exc))
        finally:
            self._release(node)

    async def _copy_big(
        self, job: DirJob, name: str, dname: str, m: Meta, replace: bool, path: str, acl: bool
    ) -> None:
        w = self.worker

        def _open() -> tuple[int, int, fsops.Landing, list[tuple[str, bytes]], bool]:
            with fsops.dir_at(w.src_root_fd, job.rel) as sdir:
                sfd = fsops.open_source(sdir, name)
            try:
                ddir = fsops.open_rel(w.dst_root_fd, job.dst_rel)
                try:
                    landing = fsops.Landing(ddir, stat.S_IMODE(m.st_mode))
                except BaseException:
                    os.close(ddir)
                    raise
                xattrs = fsops.get_xattrs(sfd)
                cloned = not fsops.is_sparse(m) and ffi.reflink(sfd, landing.fd)
            except BaseException:
                os.close(sfd)
                raise
            return sfd, ddir, landing, xattrs, cloned

        sfd, ddir, landing, xattrs, cloned = await trio.to_thread.run_sync(_open)
        abandoned = False
        try:
            with StallGuard(f"copy of {path}", self.timeouts.stall) as guard:
                if not cloned:
                    sparse = fsops.is_sparse(m)
                    if sparse:
                        ranges = await trio.to_thread.run_sync(fsops.data_extents, sfd, m.st_size)
                    else:
                        ranges = [(0, m.st_size)]
                    chunks = deque(
                        (o, min(CHUNK, off + length - o)) for off, length in ranges for o in range(off, off + length, CHUNK)
                    )
                    state = {"abandoned": False, "short": False, "running": False, "left": False}
                    lock = threading.Lock()

                    def step(off: int, want: int) -> int:
                        with lock:
                            if state["left"]:  # its caller was cancelled before it began and
                                return 0  # closed the fds itself: they may be others' now
                            state["running"] = True
                        try:
                            return fsops.copy_range(sfd, landing.fd, off, want)
                        finally:
                            with lock:
                                state["running"] = False
                                if state["abandoned"]:  # the caller was cancelled and left us
                                    _release_fds(landing, sfd, ddir)  # the fds (QA: a library
                                    # caller's cancelled copies kept 3 fds and the data each)

                    # One pump per file: parallel writes into one file serialise on its inode
                    # lock (measured on tmpfs: 2 threads 1.77 s vs 1 thread 1.13 s for 2 GiB).
                    # Different files do run in parallel (big_limiter).
                    try:
                        while chunks and not state["short"]:
                            off, want = chunks.popleft()
                            try:
                                n = await trio.to_thread.run_sync(step, off, want, abandon_on_cancel=True)
                            except trio.Cancelled:
                                with lock:  # a thread in the copy closes the fds when done; one
                                    state["abandoned"] = bool(state["running"])  # not yet begun
                                    state["left"] = not state["abandoned"]  # (CI) does nothing
                                raise
                            guard.progress()
                            self.bytes_done += n
                            if n < want:
                                state["short"] = True
                    finally:
                        abandoned = state["abandoned"]
                    if state["short"]:
                        raise OSError(errno.EAGAIN, fsops.CHANGED_SIZE)
                    if sparse:
                        await trio.to_thread.run_sync(fsops.check_not_shrunk, sfd, m.st_size)
                        await trio.to_thread.run_sync(os.ftruncate, landing.fd, m.st_size)
                else:
                    self.bytes_done += m.st_size

                def _finish() -> None:
                    landing.finish_meta(m, xattrs, name, acl_inherited=acl)
                    landing.commit(dname, replace)

                await trio.to_thread.run_sync(_finish)
                guard.progress()
        except BaseException:
            if not abandoned:
                landing.abort()
            raise
        finally:
            if not abandoned:
                os.close(sfd)
                os.close(ddir)
        self.summary.files_copied += 1
        self.summary.bytes_copied += m.st_size
        self.files_done += 1
        if self.spec.record_actions:
            self.progress.action("copy", path)

    async def _remove_source(self, rel: str, dst_rel: str, name: str, m: Meta) -> None:
        """Move: flush the landed copy to disk, then remove the source entry if it is still what
        was listed as `m` (else it stays, a failure)."""
        w = self.worker

        def _remove() -> None:
            with fsops.dir_at(w.dst_root_fd, dst_rel) as ddir:
                ffi.syncfs(ddir)
            with fsops.dir_at(w.src_root_fd, rel) as sdir:
                fsops.unlink_unchanged(sdir, name, m)

        try:
            await trio.to_thread.run_sync(_remove)
        except OSError as exc:
            self._fail(_join(rel, name), "remove source", exc.strerror or str(exc))
            return
        self.summary.files_removed += 1

    # -- hard links ---------------------------------------------------------------------------

    async def _hardlink(self, node: Node, job: DirJob, name: str, dname: str, m: Meta, d: Meta | None, first: bool = False) -> None:
        """Land one member of a hard-link group: the `first` (its Event already in `inodes`)
        is copied, the rest are linked to it."""
        key = (m.st_dev, m.st_ino)
        path = _join(job.rel, name)
        what = "link"
        kept = False  # left as it was at the destination (up to date): maybe the source itself
        try:
            entry = None if first else self.inodes.get(key)
            while isinstance(entry, trio.Event):  # a first member is landing
                await entry.wait()
                # Landed: link to it. Failed: the entry is gone and the next member to get here
                # is copied as the new first (rsync -aH does the same); others wait on it.
                entry = self.inodes.get(key)
            if entry is None:
                what = "copy"
                ev = self.inodes[key] if first else trio.Event()
                assert isinstance(ev, trio.Event)
                self.inodes[key] = ev
                try:
                    first_ino, copied = await self._hardlink_first(job, name, dname, m, d, path, node.acl)
                    kept = not copied
                    if copied:
                        node.changed = True  # a new name in an existing directory: its mtime moved
                    self.inodes[key] = (job.dst_rel, dname, first_ino)
                except BaseException:
                    self.inodes.pop(key, None)
                    raise
                finally:
                    ev.set()
            else:
                first_dir, first_name, first_ino = entry
                if d is not None and d.st_ino == first_ino:
                    self.summary.files_skipped += 1
                    kept = True
                else:
                    if not self.spec.dry_run:
                        await self._batched(self._link_to_first, job.dst_rel, dname, first_dir, first_name, d is not None)
                        node.changed = True
                    if self.spec.record_actions:
                        self.progress.action("link", path)
                    self.summary.links_created += 1
            self._member_done(job, name, m, d, kept)
        except StallError as exc:
            self._fail(path, "copy", str(exc))
        except OSError as exc:
            if exc.errno in FATAL_ERRNOS:
                self._fatal(f"{exc.strerror} (writing {_join(job.dst_rel, dname)})")
            self._fail(path, what, exc.strerror or str(exc))
        finally:
            self.files_done += 1
            self._release(node)

    async def _links_of_dir(self, node: Node, job: DirJob, members: list[_Member]) -> None:
        """The hard-link members of one directory that need no per-member care (R63): its
        first members that are small regular files, new or out of date (copied) or up to date
        (settled), HOP_BATCH per thread hop (`_first_op`); then the members whose first lands
        elsewhere (linked, HOP_BATCH per hop, once their firsts have landed). One task per
        directory: a task, an Event and a hop per member kept the Trio thread busy (5,000
        groups of three: 2.1 s against rsync -aH's 0.5 s).
        A member whose first failed is handed to `_hardlink`, which copies it as the new first."""
        try:
            firsts = [mb for mb in members if mb[4] is not Op.HARDLINK]
            for i in range(0, len(firsts), HOP_BATCH):
                await self._land_firsts(node, job, firsts[i : i + HOP_BATCH])
            links: list[tuple[str, str, Meta, Meta | None, str, str]] = []
            for name, dname, m, d, how in members:
                if how is not Op.HARDLINK:
                    continue
                key = (m.st_dev, m.st_ino)
                entry = self.inodes.get(key)
                while isinstance(entry, trio.Event):  # its first is landing (elsewhere)
                    await entry.wait()
                    entry = self.inodes.get(key)
                if entry is None:  # its first failed: this one is copied as the new first
                    node.pending += 1
                    self._work.start_soon(self._hardlink, node, job, name, dname, m, d, False)
                    continue
                first_dir, first_name, first_ino = entry
                if d is not None and d.st_ino == first_ino:  # linked already
                    self.summary.files_skipped += 1
                    self.files_done += 1
                    self._member_done(job, name, m, d, kept=True)
                    continue
                links.append((name, dname, m, d, first_dir, first_name))
            for i in range(0, len(links), HOP_BATCH):
                await self._make_links(node, job, links[i : i + HOP_BATCH])
        finally:
            self._release(node)

    async def _batched(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the run's batcher of hard-link hops (started on first use). Raises
        StallError when its hop made no progress for the stall time."""
        if self._batcher is None:
            assert self._nursery is not None
            self._batcher = _Batcher(self._nursery, self.timeouts.stall)
        return await self._batcher.run(fn, *args)

    def _first_op(self, m: Meta, d: Meta | None) -> Op | None:
        """How `_links_of_dir` lands a group's first member: COPY (a small regular file, new or
        out of date; counted only in a dry run), SAME (up to date: its metadata settled), or
        None: `_hardlink` takes it (large, sparse or not a regular file; --checksum; a time
        that needs its filesystem's step)."""
        if not stat.S_ISREG(m.st_mode):
            return None
        if d is None:
            op = Op.COPY
        elif m.st_mtime_ns == d.st_mtime_ns or d.st_mtime_ns % 1000:
            op = up_to_date(m, d, self.spec.compare)
        else:
            return None
        if op is Op.SAME or (op is Op.COPY and (self.spec.dry_run or (m.st_size <= LINK_SMALL and not fsops.is_sparse(m)))):
            return op
        return None

    async def _land_firsts(self, node: Node, job: DirJob, firsts: list[_Member]) -> None:
        """Copy or settle first members in one thread hop (none in a dry run); record each
        one's destination inode for its group, or drop the group's entry when it failed."""
        results: list[int | OSError]
        dry = self.spec.dry_run
        if dry:
            results = [-1 if d is None or how is Op.COPY else d.st_ino for _n, _dn, _m, d, how in firsts]
        else:
            out = _Results()
            try:
                results = await self._batched(self._firsts, job, firsts, node.acl, out)
            except StallError as exc:  # a hung disk: those not done fail, their groups hand over
                results = out.stop(len(firsts), exc)
        fatal: str | None = None
        for (name, dname, m, d, how), r in zip(firsts, results):
            key = (m.st_dev, m.st_ino)
            ev = self.inodes.get(key)
            path = _join(job.rel, name)
            self.files_done += 1
            if isinstance(r, OSError):
                self.inodes.pop(key, None)
                if r.errno in FATAL_ERRNOS and fatal is None:
                    fatal = f"{r.strerror} (writing {_join(job.dst_rel, dname)})"
                self._fail(path, "copy", r.strerror or str(r))
            else:
                self.inodes[key] = (job.dst_rel, dname, r)
                if how is Op.SAME:
                    self.summary.files_skipped += 1
                else:
                    self.bytes_done += m.st_size
                    self.summary.files_copied += 1
                    self.summary.bytes_copied += m.st_size
                    if self.spec.record_actions:
                        self.progress.action("copy", path)
                    node.changed |= not dry
                self._member_done(job, name, m, d, kept=how is Op.SAME)
            if isinstance(ev, trio.Event):
                ev.set()
        if fatal is not None:
            self._fatal(fatal)

    def _firsts(self, job: DirJob, firsts: list[_Member], acl: bool, out: _Results | None = None) -> list[int | OSError]:
        """Worker thread: first members of one directory copied (fsops.copy_small, as the
        worker copies a plain small file) or, up to date, their xattrs and metadata settled;
        each one's destination inode or its error."""
        w = self.worker
        try:
            with fsops.dir_at(w.src_root_fd, job.rel) as sdir, fsops.dir_at(w.dst_root_fd, job.dst_rel) as ddir:
                res = out if out is not None else _Results()
                for name, dname, m, d, how in firsts:
                    if res.stopped:  # its caller gave up on a hung disk
                        break
                    try:
                        if how is Op.SAME:
                            assert d is not None
                            fsops.fix_meta(ddir, dname, m, d, fsops.sync_xattrs(sdir, name, ddir, dname))
                            res.done.append(d.st_ino)
                        else:
                            fsops.copy_small(sdir, name, ddir, dname, m, d is not None, acl_inherited=acl)
                            res.done.append(os.stat(dname, dir_fd=ddir, follow_symlinks=False).st_ino)
                    except OSError as exc:
                        res.done.append(exc)
                return res.done
        except OSError as exc:  # a directory could not be opened
            return [exc] * len(firsts)

    async def _make_links(self, node: Node, job: DirJob, links: list[tuple[str, str, Meta, Meta | None, str, str]]) -> None:
        """Link members to their landed firsts in one thread hop (none in a dry run)."""
        results: list[OSError | None]
        if self.spec.dry_run:
            results = [None] * len(links)
        else:
            items = [(dname, first_dir, first_name, d is not None) for _n, dname, _m, d, first_dir, first_name in links]
            out = _Results()
            try:
                results = await self._batched(self._link_many, job.dst_rel, items, out)
            except StallError as exc:  # a hung disk: those not done fail
                results = out.stop(len(links), exc)
        fatal: str | None = None
        for (name, dname, m, _d, _fd, _fn), r in zip(links, results):
            path = _join(job.rel, name)
            self.files_done += 1
            if r is not None:
                if r.errno in FATAL_ERRNOS and fatal is None:
                    fatal = f"{r.strerror} (writing {_join(job.dst_rel, dname)})"
                self._fail(path, "link", r.strerror or str(r))
                continue
            if not self.spec.dry_run:
                node.changed = True
            if self.spec.record_actions:
                self.progress.action("link", path)
            self.summary.links_created += 1
            self._member_done(job, name, m, None, kept=False)
        if fatal is not None:
            self._fatal(fatal)

    def _link_many(self, dst_rel: str, items: list[tuple[str, str, str, bool]], out: _Results | None = None) -> list[OSError | None]:
        """Worker thread: each (name, first's directory, first's name, replace) linked in
        directory `dst_rel`; None or the error, per item. The firsts' directories stay open
        for the batch, LINK_DIRS_OPEN at a time."""
        w = self.worker
        dirs: dict[str, int] = {}
        try:
            try:
                ddir = dirs[dst_rel] = fsops.open_rel(w.dst_root_fd, dst_rel)
            except OSError as exc:
                return [exc] * len(items)
            res = out if out is not None else _Results()
            for dname, first_dir, first_name, replace in items:
                if res.stopped:  # its caller gave up on a hung disk
                    break
                try:
                    fdir = dirs.get(first_dir)
                    if fdir is None:
                        if len(dirs) > LINK_DIRS_OPEN:  # (QA: 16 each, 4 hops, failed under ulimit -n 64)
                            for rel, fd in list(dirs.items()):
                                if rel != dst_rel:
                                    os.close(fd)
                                    del dirs[rel]
                        fdir = dirs[first_dir] = fsops.open_rel(w.dst_root_fd, first_dir)
                    fsops.make_hardlink(ddir, dname, fdir, first_name, replace)
                    res.done.append(None)
                except OSError as exc:
                    res.done.append(exc)
            return res.done
        finally:
            for fd in dirs.values():
                os.close(fd)

    async def _hardlink_first(
        self, job: DirJob, name: str, dname: str, m: Meta, d: Meta | None, path: str, acl: bool
    ) -> tuple[int, bool]:
        """Land the first member of a group: its destination inode and whether it was written."""
        w = self.worker
        if not stat.S_ISREG(m.st_mode):
            return await self._other_first(job, name, dname, m, d, path, acl)

        def _granularity() -> int:
            with fsops.dir_at(w.dst_root_fd, job.dst_rel) as ddir:
                return fsops.time_granularity(ddir)

        if d is None:
            op = Op.COPY
        elif m.st_mtime_ns == d.st_mtime_ns or d.st_mtime_ns % 1000:
            op = up_to_date(m, d, self.spec.compare)  # same_mtime needs no filesystem probe
        else:  # the destination's time may be the source's cut to its filesystem's step (R49)
            op = await trio.to_thread.run_sync(up_to_date, m, d, self.spec.compare, _granularity)

        def _check_hash() -> bool:
            with fsops.dir_at(w.src_root_fd, job.rel) as sdir, fsops.dir_at(w.dst_root_fd, job.dst_rel) as ddir:
                return fsops.file_hash(sdir, name) == fsops.file_hash(ddir, dname)

        if op is Op.HASH and not self.spec.dry_run:
            op = Op.SAME if await trio.to_thread.run_sync(_check_hash) else Op.COPY
        if op is not Op.COPY and d is not None:
            self.summary.files_skipped += 1
            if not self.spec.dry_run:

                def _settle() -> None:
                    with fsops.dir_at(w.src_root_fd, job.rel) as sdir, fsops.dir_at(w.dst_root_fd, job.dst_rel) as ddir:
                        acl = fsops.sync_xattrs(sdir, name, ddir, dname)
                        fsops.fix_meta(ddir, dname, m, d, acl)

                await trio.to_thread.run_sync(_settle)
            return d.st_ino, False
        if self.spec.dry_run:
            if self.spec.record_actions:
                self.progress.action("copy", path)
            self.summary.files_copied += 1
            self.summary.bytes_copied += m.st_size
            return -1, False
        if m.st_size <= LINK_SMALL and not fsops.is_sparse(m):
            r = (await self._batched(self._firsts, job, [(name, dname, m, d, Op.COPY)], acl))[0]
            if isinstance(r, OSError):
                raise r
            ino = r
            self.bytes_done += m.st_size
            self.summary.files_copied += 1
            self.summary.bytes_copied += m.st_size
            if self.spec.record_actions:
                self.progress.action("copy", path)
            return ino, True
        async with self.link_limiter:
            await self._copy_big(job, name, dname, m, d is not None, path, acl)
        self.files_done -= 1  # _copy_big counts the file; _hardlink counts each member

        def _ino() -> int:
            with fsops.dir_at(w.dst_root_fd, job.dst_rel) as ddir:
                return os.stat(dname, dir_fd=ddir, follow_symlinks=False).st_ino

        return await trio.to_thread.run_sync(_ino), True

    async def _other_first(self, job: DirJob, name: str, dname: str, m: Meta, d: Meta | None, path: str, acl: bool) -> tuple[int, bool]:
        """The first name of a hard-linked symlink, FIFO, socket or device, made here (or found
        already made): its destination inode (-1 in a dry run that would make it) and whether
        it was made."""
        w = self.worker
        dry = self.spec.dry_run

        def _land() -> tuple[str | None, int]:
            with fsops.dir_at(w.src_root_fd, job.rel) as sdir:
                target = os.readlink(name, dir_fd=sdir) if stat.S_ISLNK(m.st_mode) else None
                xattrs = fsops.xattrs_at(sdir, name)
            if dry and d is None:  # (its directory may not exist: a dry run made none)
                return fsops.land_other(-1, dname, m, None, target, xattrs, acl, dry), -1
            with fsops.dir_at(w.dst_root_fd, job.dst_rel) as ddir:
                act = fsops.land_other(ddir, dname, m, d, target, xattrs, acl, dry)
                if act is None:
                    assert d is not None
                    return None, d.st_ino
                return act, -1 if dry else os.stat(dname, dir_fd=ddir, follow_symlinks=False).st_ino

        act, ino = await trio.to_thread.run_sync(_land)
        if act is None:
            self.summary.files_skipped += 1
            return ino, False
        if self.spec.record_actions:
            self.progress.action(act, path)
        self.summary.links_created += 1
        return ino, not dry

    def _member_done(self, job: DirJob, name: str, m: Meta, d: Meta | None, kept: bool) -> None:
        """Move: a hard-link member is at the destination (landed, or `kept` as it was); its
        source goes at the end of the run, unless it is that destination itself."""
        if not self.spec.move:
            return
        if kept and fsops.same_inode(m, d):
            self._fail(_join(job.rel, name), "remove source", fsops.SAME_FILE)  # the destination is the source itself
        elif not self.spec.dry_run:
            self._defer_removal(job, name, m)

    def _defer_removal(self, job: DirJob, name: str, m: Meta) -> None:
        """Move: a hard-link member is at the destination; its source goes at the end of the run
        (if it is still what was listed as `m`)."""
        self.link_sources.setdefault(job.rel, (job.dst_rel, []))[1].append((name, m))

    async def _remove_link_sources(self) -> None:
        """Move: remove the landed hard-link members once every source directory was read.
        Removing one earlier would lower the link count its peers show to the scans still to
        come, and a peer judged by that count would be copied as a file of its own."""
        if not self.link_sources:
            return
        removed, failures = await trio.to_thread.run_sync(self._unlink_links, self.link_sources)
        self.summary.files_removed += removed
        for f in failures:
            self._fail(*f)

    def _unlink_links(self, todo: dict[str, tuple[str, list[tuple[str, Meta]]]]) -> tuple[int, list[tuple[str, str, str]]]:
        """Runs in a thread: flush the destination, unlink the sources, then remove the source
        directories they kept (the finalizer found them not empty), deepest first."""
        w = self.worker
        failures: list[tuple[str, str, str]] = []
        synced: set[int] = set()
        for dst_rel, _ in todo.values():
            try:
                with fsops.dir_at(w.dst_root_fd, dst_rel) as ddir:
                    dev = os.fstat(ddir).st_dev
                    if dev not in synced:
                        ffi.syncfs(ddir)
                        synced.add(dev)
            except OSError as exc:
                return 0, [(dst_rel or ".", "sync", exc.strerror or str(exc))]
        removed = 0
        dirs: set[str] = set()
        for rel, (_, names) in todo.items():
            try:
                with fsops.dir_at(w.src_root_fd, rel) as sdir:
                    for name, m in names:
                        try:
                            fsops.unlink_unchanged(sdir, name, m)
                            removed += 1
                        except OSError as exc:
                            failures.append((_join(rel, name), "remove source", exc.strerror or str(exc)))
            except OSError as exc:
                failures.append((rel or ".", "remove source", exc.strerror or str(exc)))
            while rel and rel not in dirs:  # the top ("") is not ours to remove
                dirs.add(rel)
                rel = rel.rpartition("/")[0]
        for rel in sorted(dirs, key=lambda r: -r.count("/")):
            parent, _, base = rel.rpartition("/")
            try:
                with fsops.dir_at(w.src_root_fd, parent) as pfd:
                    os.rmdir(base, dir_fd=pfd)
            except OSError:
                pass  # leftovers (failures, excluded entries) keep it, as in the finalizer
        return removed, failures

    def _link_to_first(self, dst_rel: str, dname: str, first_dir: str, first_name: str, replace: bool) -> None:
        w = self.worker
        with fsops.dir_at(w.dst_root_fd, dst_rel) as ddir, fsops.dir_at(w.dst_root_fd, first_dir) as fdir:
            fsops.make_hardlink(ddir, dname, fdir, first_name, replace)

    # -- directory metadata -------------------------------------------------------------------

    async def _finalizer(self) -> None:
        """Apply directory metadata once a directory's subtree is done; children before parents."""
        done = False
        while not done:
            node = await self._fin_recv.receive()
            batch: list[Node] = []
            while True:
                if node is None:
                    done = True
                    break
                if self._needs_finalize(node):
                    batch.append(node)
                try:
                    node = self._fin_recv.receive_nowait()
                except trio.WouldBlock:
                    break
            if batch:
                for f in await trio.to_thread.run_sync(self._finalize_batch, batch):
                    self._fail(*f)
        self._fin_done.set()

    def _needs_finalize(self, node: Node) -> bool:
        if self.spec.dry_run or not node.own or node.meta is None:
            return self.spec.move and not self.spec.dry_run and node.own
        if node.new or node.changed or self.spec.move or node.parent is None:
            return True  # (the top: its xattrs are compared here, no parent's plan does it)
        d, m = node.dst_meta, node.meta
        if d is None:
            return True
        return (
            d.st_mtime_ns != m.st_mtime_ns
            or stat.S_IMODE(d.st_mode) != stat.S_IMODE(m.st_mode)
            or (fsops.IS_ROOT and (d.st_uid != m.st_uid or d.st_gid != m.st_gid))
        )

    def _finalize_batch(self, batch: list[Node]) -> list[tuple[str, str, str]]:
        w = self.worker
        failures = []
        for node in batch:
            if node.meta is not None:
                try:
                    xattrs: list[tuple[str, bytes]] | None = None
                    if node.new or node.changed or node.parent is None:
                        with fsops.dir_at(w.src_root_fd, node.src_rel) as sfd:
                            xattrs = fsops.get_xattrs(sfd)
                    with fsops.dir_at(w.dst_root_fd, node.dst_rel) as dfd:
                        if node.parent is None and not node.new:
                            # An existing top directory (`SRC/ DST/`): its xattrs and ACLs made
                            # the source's, extra ones dropped (a subdirectory's are, in its
                            # parent's plan; the top's never were).
                            fsops.replace_xattrs(dfd, ".", dict(fsops.get_xattrs(dfd)), dict(xattrs or ()))
                            xattrs = None
                        fsops.set_dir_meta(dfd, node.meta, xattrs)
                except OSError as exc:
                    failures.append((node.dst_rel or ".", "directory metadata", exc.strerror or str(exc)))
            if self.spec.move and node.src_rel and not fsops.same_inode(node.meta, node.dst_meta):
                # The source directory goes once it is empty; leftovers (failures, excluded) keep it.
                # (Not when it is the destination directory by another path: a bind mount, R51.)
                parent, _, base = node.src_rel.rpartition("/")
                try:
                    with fsops.dir_at(w.src_root_fd, parent) as pfd:
                        os.rmdir(base, dir_fd=pfd)
                except OSError:
                    pass
        return failures

    # -- mirror deletions ---------------------------------------------------------------------

    async def _delete_extras(self) -> None:
        if not self.deletions:
            return
        if self.scan_incomplete or self.dst_unread:
            # Counted as the deletion would have counted them: every entry below an extra directory.
            n = await trio.to_thread.run_sync(self._count_deletions, self.deletions, [])
            self.summary.deletions_skipped = nothing_deleted(len(self.scan_incomplete), self.dst_unread, n)
            return
        gone: list[str] = []  # what the `delete` lines name, once done (a dry run: would be)
        if self.spec.dry_run:
            self.summary.files_deleted += await trio.to_thread.run_sync(self._count_deletions, self.deletions, gone)
            failures: list[tuple[str, str, str]] = []
        else:
            # Ctrl-C stops it between two entries (it went on to the end, then exited 0).
            deleted, failures = await run_stoppable(self._delete_batch, self.deletions, gone, stop=self._stop_deleting)
            self.summary.files_deleted += deleted
        if self.spec.record_actions:
            for path in gone:
                self.progress.action("delete", path)
        # A directory whose metadata could not be put back when it was finalised fails the
        # same way once its deletions are done: one line, not two.
        told = {(f.path, f.op, f.message) for f in self.summary.failures}
        for f in failures:
            if f not in told:
                self._fail(*f)

    def _stop_deleting(self) -> None:
        self.stop.is_set = True

    def _count_deletions(self, deletions: list[tuple[str, list[tuple[str, bool]], Meta | None]], gone: list[str]) -> int:
        """Runs in a thread, a dry run's: what `_delete_batch` would count (every entry below
        an extra directory), changing nothing."""
        root, filters = self.worker.dst_root_fd, self.spec.filters
        return sum(fsops.count_extras(root, dst_rel, [n for n, _ in extras], filters, gone=gone) for dst_rel, extras, _ in deletions)

    def _delete_batch(
        self, deletions: list[tuple[str, list[tuple[str, bool]], Meta | None]], gone: list[str]
    ) -> tuple[int, list[tuple[str, str, str]]]:
        """Runs in a thread: touches no shared state but `gone` (the paths the `delete` lines
        name), returns (entries deleted, failures)."""
        w = self.worker
        filters = self.spec.filters
        deleted = 0
        failures: list[tuple[str, str, str]] = []
        flag = self.stop

        def stop() -> bool:  # Ctrl-C: removal ends at the next entry (InterruptedError)
            return flag.is_set

        # Deepest directories first, so a parent's times are restored after its children's.
        for dst_rel, extras, meta in sorted(deletions, key=lambda d: -d[0].count("/") - bool(d[0])):
            if stop():
                break
            try:
                dfd = fsops.open_rel(w.dst_root_fd, dst_rel)
            except OSError as exc:
                failures.append((dst_rel or ".", "delete", exc.strerror or str(exc)))
                continue
            try:
                for name, _ in extras:
                    path = _join(dst_rel, name)
                    subs: list[str] = []
                    stuck: list[tuple[str, str]] = []  # entries below it that would not go
                    try:
                        # A read-only directory of ours is opened up, its mode restored below
                        # (not ours: the refusal itself is what to say, as through a daemon).
                        deleted += fsops.remove_extra_opening(dfd, name, path, filters, subs, stop, stuck)
                    except InterruptedError as exc:  # interrupted: what went is named, the rest stays
                        deleted += fsops.removed_below(exc)
                    except OSError as exc:
                        deleted += fsops.removed_below(exc)
                        failures.append((path, "delete", exc.strerror or str(exc)))
                    failures += ((p, "delete", why) for p, why in stuck)
                    # (after a retry the directory itself went too: one line names it all)
                    gone += [path] if "" in subs else (fsops.below(path, sub) for sub in subs)
                    if stop():
                        break
                if meta is not None and not stop():
                    try:
                        fsops.set_dir_meta(dfd, meta, None)
                    except OSError as exc:
                        failures.append((dst_rel or ".", "directory metadata", exc.strerror or str(exc)))
            finally:
                os.close(dfd)
        return deleted, failures


def _link_order(link: tuple[str, str, Meta, Meta | None]) -> tuple[bool, str]:
    """Hard-link members of one directory: an up-to-date one (size and mtime) first, then by name."""
    name, _dname, m, d = link
    fresh = d is not None and stat.S_IFMT(d.st_mode) == stat.S_IFMT(m.st_mode) and d.st_size == m.st_size and d.st_mtime_ns == m.st_mtime_ns
    return (not fresh, name)

