"""Run the selected workloads at each location, interleaved, and collect the results.

For each location (tmpfs, disk) the runner takes a fixed work root, locks it (flock on the
directory, so two benches never share one), wipes what a crashed run may have left there, and
removes everything when it ends, also on failure or Ctrl-C/SIGTERM (the caller turns those into
KeyboardInterrupt; the measured command is killed with its process group first).

For each case, runs are interleaved: run 1 of every tool, then run 2 of every tool, and so on
(A B C A B C ...). Before each timed run, outside the timing, the destination is put in the
case's starting state (removed, restored from the prior copy, or left as the up-to-date copy)
and, on the disk, ``sync`` is run. A fresh-copy case starts with one untimed ``cp -a`` of the
source, removed at once, so that the first tool timed does not pay alone for cold caches. After each tool's first run its destination is compared with
the source (trees.compare): blit's byte for byte with every piece of metadata, the peers'
by metadata; a tree that differs in structure, size or content (or for blit in any way) marks
the row INVALID. A non-zero exit marks it FAILED and stops that tool for the case.

Remote workloads (kind "remote") run the same way against daemons on 127.0.0.1: the runner
enters the workload's session (daemons.py) once per location, before the first remote workload,
and keeps it until the location ends; each command gets an endpoint for its remote side, runs
with the session's environment (HOME in the work root, for blit's known-hosts pin), and the
daemon it talks to is measured too (RSS, CPU). The loopback TCP limit (link.py, iperf3) is
measured once per bench run, before the first location, when a remote workload is selected.

This module must not format reports (report.py does).
"""

from __future__ import annotations

import fcntl
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import daemons, link, measure, trees
from bench.measure import Sample
from bench.tools import BLITS, Tools, default_blit
from bench.workloads import DISK_TARGET, WORKLOADS, Case, Target, Workload

MARKER = ".blit-bench-root"
DEFAULT_RUNS = {"tmpfs": 5, "disk": 7}


class BenchError(Exception):
    """A problem that stops the bench (bad option, unusable work root)."""


@dataclass
class Settings:
    workloads: list[str]
    wheres: list[str]
    roots: dict[str, str]
    scale: str = "full"  # full, quick or smoke
    runs: int | None = None
    tools: set[str] | None = None
    huge_peers: bool = False
    blit: str = field(default_factory=default_blit)
    verify: bool = True

    def runs_for(self, where: str, workload: Workload) -> int:
        n = self.runs if self.runs is not None else (
            1 if self.scale in ("quick", "smoke") else DEFAULT_RUNS[where])
        return min(n, workload.max_runs) if workload.max_runs else n


@dataclass
class ToolResult:
    key: str
    label: str
    command: str
    is_blit: bool
    status: str = "ok"  # ok, INVALID, FAILED, missing
    check: str = "not checked"
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def walls(self) -> list[float]:
        return [s.wall_s for s in self.samples if s.exit_code == 0]

    @property
    def median(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None

    @property
    def spread(self) -> tuple[float, float] | None:
        return (min(self.walls), max(self.walls)) if self.walls else None

    @property
    def ttfbs(self) -> list[float]:
        return [s.ttfb_s for s in self.samples if s.ttfb_s is not None]

    @property
    def ttfb_median(self) -> float | None:
        return statistics.median(self.ttfbs) if self.ttfbs else None

    @property
    def peak_rss_kib(self) -> int | None:
        return max((s.peak_rss_kib for s in self.samples), default=None)

    def _median_of(self, attr: str) -> float | None:
        xs = [getattr(s, attr) for s in self.samples
              if s.exit_code == 0 and getattr(s, attr) is not None]
        return statistics.median(xs) if xs else None

    @property
    def cpu_median(self) -> float | None:
        return self._median_of("cpu_s")

    @property
    def server_cpu_median(self) -> float | None:
        return self._median_of("server_cpu_s")

    @property
    def server_rss_kib(self) -> int | None:
        return max((s.server_rss_kib for s in self.samples if s.server_rss_kib is not None),
                   default=None)

    def to_json(self) -> dict[str, object]:
        spread = self.spread
        return {
            "tool": self.key,
            "label": self.label,
            "command": self.command,
            "status": self.status,
            "check": self.check,
            "median_s": self.median,
            "min_s": spread[0] if spread else None,
            "max_s": spread[1] if spread else None,
            "ttfb_median_s": self.ttfb_median,
            "peak_rss_kib": self.peak_rss_kib,
            "cpu_median_s": self.cpu_median,
            "server_cpu_median_s": self.server_cpu_median,
            "server_peak_rss_kib": self.server_rss_kib,
            "notes": self.notes,
            "runs": [s.to_json() for s in self.samples],
        }


@dataclass
class TargetResult:
    text: str
    status: str  # PASS, FAIL, n/a
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"target": self.text, "status": self.status, "detail": self.detail}


@dataclass
class CaseResult:
    case: Case
    runs: int
    tools: list[ToolResult] = field(default_factory=list)
    targets: list[TargetResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    total_bytes: int = 0
    link: link.Link | None = None  # remote cases: the loopback TCP limit of this bench run

    @property
    def blit(self) -> ToolResult | None:
        """The blit row the ratios are taken against (the first: TLS on, for remote)."""
        return next((t for t in self.tools if t.is_blit), None)

    def ratio(self, peer: str, base: str | None = None) -> float | None:
        """peer median / blit median (or / ``base``'s): above 1 means blit is faster."""
        b = self.blit if base is None else next((t for t in self.tools if t.key == base), None)
        p = next((t for t in self.tools if t.key == peer), None)
        if b is None or p is None or b.median is None or p.median is None or b.median <= 0:
            return None
        return p.median / b.median

    def rate(self, t: ToolResult) -> float | None:
        """Bytes per second of ``t``'s median run (tree bytes / median wall time)."""
        return self.total_bytes / t.median if t.median else None

    def to_json(self) -> dict[str, object]:
        return {
            "case": self.case.key,
            "title": self.case.title,
            "mode": self.case.mode,
            "start": self.case.start,
            "runs": self.runs,
            "direction": self.case.direction,
            "total_bytes": self.total_bytes,
            "tools": [t.to_json() for t in self.tools],
            "ratios": {t.key: self.ratio(t.key) for t in self.tools if t is not self.blit},
            "targets": [t.to_json() for t in self.targets],
            "notes": self.notes,
        }


@dataclass
class WorkloadResult:
    workload: Workload
    spec: trees.TreeSpec
    cases: list[CaseResult] = field(default_factory=list)
    generate_s: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "workload": self.workload.key,
            "title": self.workload.title,
            "tree": self.spec.describe(),
            "tree_spec": self.spec.__dict__,
            "generate_s": self.generate_s,
            "cases": [c.to_json() for c in self.cases],
        }


@dataclass
class LocationResult:
    where: str
    root: str
    workloads: list[WorkloadResult] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"where": self.where, "root": self.root,
                "workloads": [w.to_json() for w in self.workloads]}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- work roots ---------------------------------------------------------------------------


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while cleaning up; they are delivered afterwards."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class WorkRoot:
    """A locked, bench-owned directory; everything generated lives under it."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._fd = -1

    def acquire(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = -1
            raise BenchError(f"another bench run is using {self.path}") from None
        entries = os.listdir(self.path)
        if entries and MARKER not in entries:
            os.close(self._fd)
            self._fd = -1
            raise BenchError(f"{self.path} is not empty and is not a bench work root; "
                             "refusing to wipe it (pick another root)")
        if len(entries) > 1:
            log(f"bench: removing what a previous run left in {self.path}")
        self._wipe()
        with open(os.path.join(self.path, MARKER), "w") as f:
            f.write("made by python -m bench; removed when the bench ends\n")

    def _wipe(self) -> None:
        for name in os.listdir(self.path):
            if name != MARKER:
                trees.remove(os.path.join(self.path, name))

    def release(self) -> None:
        if self._fd < 0:
            return
        with _signals_deferred():
            try:
                self._wipe()
                os.unlink(os.path.join(self.path, MARKER))
                os.rmdir(self.path)
            finally:
                os.close(self._fd)
                self._fd = -1


# -- running ------------------------------------------------------------------------------


class Runner:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.tools = Tools(settings.blit)
        self.blit_ok = self.tools.blit_available()
        self.results: list[LocationResult] = []  # filled as the run goes, so partial on Ctrl-C
        self.link: link.Link | None = None

    def run(self) -> list[LocationResult]:
        from bench.workloads import WORKLOADS

        if any(WORKLOADS[k].kind == "remote" for k in self.s.workloads):
            log("measuring the loopback TCP limit (iperf3)")
            self.link = (link.measure(nbytes="256M") if self.s.scale == "smoke"
                         else link.measure(duration_s=3))
            log(f"  loopback: {self.link.describe()}")
        for where in self.s.wheres:
            self.results.append(LocationResult(where, self.s.roots[where]))
            self._run_location(where, self.results[-1])
        return self.results

    def _run_location(self, where: str, result: LocationResult) -> None:
        root = WorkRoot(self.s.roots[where])
        root.acquire()
        sessions = ExitStack()
        entered: dict[object, object] = {}
        try:
            os.mkdir(os.path.join(root.path, "src"))
            os.mkdir(os.path.join(root.path, "run"))
            keys = self.s.workloads
            sources: dict[trees.TreeSpec, str] = {}
            for i, key in enumerate(keys):
                wl = WORKLOADS[key]
                spec = wl.spec(self.s.scale)
                wres = WorkloadResult(wl, spec)
                result.workloads.append(wres)
                src = sources.get(spec)
                if src is None:
                    src = os.path.join(root.path, "src", spec.name)
                    log(f"[{where}] generating {spec.name}: {spec.describe()}")
                    t0 = time.perf_counter()
                    trees.generate(spec, src)
                    if where == "disk":
                        trees.sync()
                    wres.generate_s = time.perf_counter() - t0
                    sources[spec] = src
                remote = self._session(sessions, entered, wl, root.path)
                for case in wl.cases:
                    wres.cases.append(self._run_case(where, root.path, wl, case, spec, src,
                                                     remote))
                later = {WORKLOADS[k].spec(self.s.scale) for k in keys[i + 1:]}
                if wl.mutates_source or spec not in later:
                    trees.remove(src)
                    del sources[spec]
        finally:
            try:
                sessions.close()  # stops the daemons (signals held meanwhile)
            finally:
                root.release()

    def _session(self, stack: ExitStack, entered: dict[object, object], wl: Workload,
                 root: str) -> object:
        """Enter ``wl``'s session once per location (kept until it ends); its value."""
        if wl.session not in entered:
            try:
                entered[wl.session] = stack.enter_context(wl.session(root, self.s.blit))
            except daemons.DaemonError as exc:
                raise BenchError(str(exc)) from None
        return entered[wl.session]

    def _case_tools(self, case: Case) -> list[str]:
        keys = list(case.tools)
        if case.optional_peers and not (self.s.huge_peers or self.s.scale == "smoke"):
            keys = [k for k in keys if k == "blit"]
        if self.s.tools is not None:
            keys = [k for k in keys if k in self.s.tools]
        return keys

    def _run_case(self, where: str, root: str, wl: Workload, case: Case,
                  spec: trees.TreeSpec, src: str, remote: object = None) -> CaseResult:
        runs = self.s.runs_for(where, wl)
        res = CaseResult(case, runs, total_bytes=spec.total_bytes)
        if case.direction is not None:
            res.link = self.link
        dst = os.path.join(root, "run", "dst")
        base = os.path.join(root, "base")
        for key in self._case_tools(case):
            tr = ToolResult(key, Tools.label(key, case.mode),
                            self.tools.shown(key, case.mode, case.direction),
                            is_blit=key in BLITS)
            if tr.is_blit and not self.blit_ok:
                tr.status = "missing"
                tr.check = f"{self.s.blit} not found"
            res.tools.append(tr)
        try:
            if case.start == "changed":
                trees.remove(base)
                trees.clone(src, base)
                changed = trees.mutate(spec, src)
                res.notes.append(f"{changed:,} of {spec.files:,} files rewritten in place (new "
                                 "content, same size, mtime + 100 s) after the prior copy")
            elif case.start == "empty":
                # Warm-up, untimed: the first copy after generating a tree pays for reading it
                # and for the kernel's first allocation of the destination's pages (a 2 GiB
                # file on tmpfs took 6.8 s then 1.7 s); without this, tool A pays for all.
                trees.remove(dst)
                trees.clone(src, dst)
                trees.remove(dst)
            elif case.start == "unchanged":
                trees.remove(dst)
                trees.clone(src, dst)
                res.notes.append("destination made an up-to-date copy (cp -a) once, before "
                                 "the first run")
            active = [t for t in res.tools if t.status == "ok"]
            for r in range(runs):
                for tr in active:
                    if tr.status == "FAILED":
                        continue
                    self._prepare(case, tr.key, dst, base, where)
                    env, server = None, None
                    a, b = src, dst
                    if isinstance(remote, daemons.Daemons):
                        if case.direction == "push":
                            b = remote.url(tr.key, dst + "/")
                        else:
                            a = remote.url(tr.key, src + "/")
                        env, server = remote.env, remote.pid(tr.key)
                    argv = self.tools.argv(tr.key, case.mode, a, b)
                    sample = measure.run(
                        argv,
                        ttfb_src=src if case.ttfb else None,
                        ttfb_dst=dst if case.ttfb else None,
                        env=env,
                        server=server,
                    )
                    tr.samples.append(sample)
                    self._log_sample(where, wl, case, r, runs, tr, sample)
                    if sample.exit_code != 0:
                        tr.status = "FAILED"
                        tr.check = (f"exit {sample.exit_code}: "
                                    + (sample.stderr_tail.splitlines() or [""])[-1][:300])
                        if isinstance(remote, daemons.Daemons):
                            try:
                                remote.check_alive()
                            except daemons.DaemonError as exc:
                                tr.check += f" ({str(exc).splitlines()[0]})"
                                log(str(exc))
                        log(f"    {tr.label} failed (exit {sample.exit_code}):\n"
                            f"{sample.stderr_tail}")
                        continue
                    for note in sample.notes:
                        if note not in tr.notes:
                            tr.notes.append(note)
                    if r == 0 and self.s.verify:
                        self._verify(tr, src, dst)
            notls = next((t for t in res.tools if t.key == "blit-notls"), None)
            if notls is not None and notls is not res.blit:
                r = res.ratio("rsync", base="blit-notls")
                if r is not None:
                    res.notes.append(f"against the --no-tls row: rsync / blit --no-tls = "
                                     f"{r:.2f}x")
            res.targets = self._targets(where, case, res)
        finally:
            trees.remove(dst)
            trees.remove(base)
        return res

    def _prepare(self, case: Case, key: str, dst: str, base: str, where: str) -> None:
        if case.start == "empty":
            trees.remove(dst)
            if Tools.needs_empty_dir(key):
                os.mkdir(dst)
        elif case.start == "changed":
            trees.remove(dst)
            trees.clone(base, dst)
        # "unchanged": the destination stays the up-to-date copy made before the case
        if where == "disk":
            trees.sync()

    def _verify(self, tr: ToolResult, src: str, dst: str) -> None:
        diffs = trees.compare(src, dst, content=tr.is_blit)
        if not diffs:
            tr.check = "identical (content and metadata)" if tr.is_blit else \
                "identical (metadata)"
            return
        structural = [d for d in diffs if d.kind == trees.STRUCTURAL]
        count = f"{len(diffs)}{'+' if len(diffs) >= 20 else ''} differences"
        shown = "; ".join(str(d) for d in (structural or diffs)[:3])
        if tr.is_blit or structural:
            tr.status = "INVALID"
            tr.check = f"INVALID: {count}, e.g. {shown}"
        else:
            attrs = sorted({d.attribute for d in diffs})
            more = "+" if len(diffs) >= 20 else ""
            tr.check = (f"same files; {', '.join(attrs)} differ{'s' if len(attrs) == 1 else ''}"
                        f" on {len(diffs)}{more} entries (e.g. {diffs[0].path or '.'})")
        log(f"    check {tr.label}: {tr.check}")

    def _log_sample(self, where: str, wl: Workload, case: Case, r: int, runs: int,
                    tr: ToolResult, s: Sample) -> None:
        ttfb = f"  ttfb {s.ttfb_s:.3f} s" if s.ttfb_s is not None else ""
        log(f"[{where}] {wl.key}/{case.key} run {r + 1}/{runs}  {tr.label:<18} "
            f"{s.wall_s:8.3f} s  rss {s.peak_rss_kib / 1024:7.1f} MiB{ttfb}"
            + ("" if s.exit_code == 0 else f"  exit {s.exit_code}"))

    def _targets(self, where: str, case: Case, res: CaseResult) -> list[TargetResult]:
        targets: list[Target] = list(case.targets) if where == "tmpfs" else []
        if where == "disk" and "rsync" in case.tools:
            targets = [DISK_TARGET]
        return [evaluate(t, res) for t in targets]


def evaluate(t: Target, res: CaseResult) -> TargetResult:
    b = res.blit
    if b is None:
        return TargetResult(t.text, "n/a", "blit not run")
    if b.status == "missing":
        return TargetResult(t.text, "n/a", "blit not installed")
    if b.status != "ok":
        return TargetResult(t.text, "FAIL", f"blit {b.status}")
    if t.kind in ("ratio_min", "ratio_gt", "within"):
        assert t.peer is not None
        peer = next((x for x in res.tools if x.key == t.peer), None)
        if peer is None:
            return TargetResult(t.text, "n/a", f"{t.peer} not run")
        ratio = res.ratio(t.peer)
        if ratio is None:
            return TargetResult(t.text, "n/a", f"no median for {peer.label}")
        detail = f"{peer.label} / blit = {ratio:.2f}x"
        if t.kind == "ratio_min":
            ok = ratio >= t.value
        elif t.kind == "ratio_gt":
            ok = ratio > t.value
        else:
            ok = ratio >= 1 / (1 + t.value)
            detail += f" (blit {(1 / ratio - 1) * 100:+.1f}% vs {peer.label})"
        return TargetResult(t.text, "PASS" if ok else "FAIL", detail)
    if t.kind == "link_min":
        bps = res.link.bytes_per_second if res.link is not None else None
        if bps is None:
            return TargetResult(t.text, "n/a", res.link.note if res.link else "no iperf3 figure")
        rate = res.rate(b)
        if rate is None:
            return TargetResult(t.text, "n/a", "no median for blit")
        frac = rate / bps
        return TargetResult(t.text, "PASS" if frac >= t.value else "FAIL",
                            f"blit {rate / 1e9:.2f} GB/s = {frac * 100:.0f}% of "
                            f"{bps / 1e9:.2f} GB/s (iperf3)")
    if t.kind == "ttfb_max":
        ttfb = b.ttfb_median
        if ttfb is None:
            return TargetResult(t.text, "FAIL", "no file seen landing")
        worst = max(b.ttfbs)
        return TargetResult(t.text, "PASS" if ttfb <= t.value else "FAIL",
                            f"median {ttfb:.3f} s (max {worst:.3f} s)")
    if t.kind == "rss_max":
        rss = b.peak_rss_kib
        if rss is None:
            return TargetResult(t.text, "n/a", "no sample")
        return TargetResult(t.text, "PASS" if rss * 1024 < t.value else "FAIL",
                            f"{rss / 1024:.1f} MiB")
    raise ValueError(f"unknown target kind {t.kind!r}")
