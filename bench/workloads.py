"""The workload registry: what each workload generates, which cases it times, and its targets.

A workload names one source tree (per scale: full, quick, smoke) and one or more cases. A case
says which tools run in which mode (copy or mirror) and what the destination holds before each
timed run:

- ``empty``: nothing (removed before each run; an empty directory for the tar pipe);
- ``changed``: before the case, the destination state is saved as a prior copy of the source
  (``cp -a``) and then 1% of the source files are rewritten (new content, mtime + 100 s); before
  each run the destination is restored from that prior copy, outside the timing;
- ``unchanged``: before the case, the destination is made an exact copy of the source
  (``cp -a``), once; the tools leave it as it is (checked after each tool's first run).

Targets are those of issue 3, judged on medians of the same run, on tmpfs. On the disk the only
target is "not slower than rsync -a" (added by the runner to every case that has rsync).

Remote workloads (``remote-*``: the same small, large and mixed trees pushed and pulled through
a daemon on 127.0.0.1, and the nothing-changed mirror pushed) have ``kind="remote"``: the
runner enters ``Workload.session`` (daemons.session: a blit daemon with TLS, one with
``--no-tls`` and an rsync daemon, exporting the work root as module ``mod``) once per location,
before the first of them, and keeps it until the location ends. A remote case has a
``direction``: ``push`` (local source, destination an endpoint) or ``pull`` (source an
endpoint, local destination). Their targets (issue 3's remote acceptance) are judged against
the rsync daemon in the same run, and the large file against the loopback TCP limit iperf3
measures once per bench run (``link_min``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ContextManager

from bench import daemons, tools
from bench.trees import TreeSpec

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

SCALES = ("full", "quick", "smoke")


@dataclass(frozen=True)
class Target:
    """One acceptance target on a case, judged from the case's summary figures.

    kind: ``ratio_min`` (peer median / blit median >= value), ``ratio_gt`` (> value),
    ``within`` (blit median <= peer median * (1 + value)), ``ttfb_max`` (blit's median TTFB
    <= value seconds), ``rss_max`` (blit's largest peak RSS < value bytes), ``link_min``
    (blit's rate, tree bytes / median, >= value x the loopback TCP rate iperf3 measured).
    """

    text: str
    kind: str
    value: float
    peer: str | None = None


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    mode: str  # tools.COPY or tools.MIRROR
    start: str  # "empty", "changed" or "unchanged"
    tools: tuple[str, ...]
    targets: tuple[Target, ...] = ()
    ttfb: bool = True
    optional_peers: bool = False  # peers run only with --huge-peers (or --smoke)
    direction: str | None = None  # remote cases: "push" or "pull"


def _no_session(root: str, blit: str) -> ContextManager[object]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    specs: dict[str, TreeSpec]  # per scale
    cases: tuple[Case, ...]
    max_runs: int | None = None
    mutates_source: bool = False
    kind: str = "local"
    session: Callable[[str, str], ContextManager[object]] = field(default=_no_session)
    """(work root, blit executable) -> a context manager around the workload's cases; the
    runner enters each distinct session once per location and keeps it to the end."""

    def spec(self, scale: str) -> TreeSpec:
        return self.specs[scale]


_FRESH_TOOLS = tools.ALL
_MIRROR_TOOLS = ("blit", "rsync")


def _small(scale: str) -> TreeSpec:
    files = {"full": 100_000, "quick": 10_000, "smoke": 200}[scale]
    return TreeSpec(f"small-{files}", files=files, file_size=4 * KiB,
                    per_dir=50 if scale == "smoke" else 500)


def _specs(make: Callable[[str], TreeSpec]) -> dict[str, TreeSpec]:
    return {scale: make(scale) for scale in SCALES}


def _large(scale: str) -> TreeSpec:
    size = {"full": 2 * GiB, "quick": 256 * MiB, "smoke": 4 * MiB}[scale]
    return TreeSpec(f"large-{size // MiB}m", big_files=1, big_size=size, seed=2)


def _mixed(scale: str) -> TreeSpec:
    big, files = {"full": (128 * MiB, 50_000), "quick": (16 * MiB, 5_000),
                  "smoke": (1 * MiB, 200)}[scale]
    return TreeSpec(f"mixed-{files}", files=files, file_size=2 * KiB,
                    per_dir=50 if scale == "smoke" else 500,
                    big_files=4, big_size=big, seed=3)


def _incremental(scale: str) -> TreeSpec:
    files = {"full": 10_000, "quick": 2_000, "smoke": 200}[scale]
    return TreeSpec(f"incremental-{files}", files=files, file_size=4 * KiB,
                    per_dir=50 if scale == "smoke" else 500, seed=4)


def _huge(scale: str) -> TreeSpec:
    files = {"full": 1_000_000, "quick": 100_000, "smoke": 1_000}[scale]
    return TreeSpec(f"huge-{files}", files=files, file_size=0,
                    per_dir=100 if scale == "smoke" else 1_000, seed=5)


WORKLOADS: dict[str, Workload] = {}


def _register(w: Workload) -> None:
    WORKLOADS[w.key] = w


def _fresh_copy(targets: tuple[Target, ...], *, optional_peers: bool = False) -> Case:
    """The "fresh copy" case (copy into an empty destination, the fresh-copy tools) with its targets."""
    return Case("fresh", "fresh copy", tools.COPY, "empty", _FRESH_TOOLS, targets, optional_peers=optional_peers)


_register(Workload(
    key="small",
    title="small files, fresh copy",
    specs=_specs(_small),
    cases=(_fresh_copy((
        Target("at least 1.5x faster than rsync -a", "ratio_min", 1.5, "rsync"),
        Target("faster than cp -a", "ratio_gt", 1.0, "cp"),
    )),),
))

_register(Workload(
    key="large",
    title="one large file, fresh copy",
    specs=_specs(_large),
    cases=(_fresh_copy((
        Target("within 10% of cp -a", "within", 0.10, "cp"),
        Target("at least 2x faster than rsync -a", "ratio_min", 2.0, "rsync"),
    )),),
))

_register(Workload(
    key="mixed",
    title="mixed sizes, fresh copy",
    specs=_specs(_mixed),
    cases=(_fresh_copy((
        Target("at least 2x faster than rsync -a", "ratio_min", 2.0, "rsync"),
    )),),
))

_register(Workload(
    key="incremental",
    title="incremental mirror",
    specs=_specs(_incremental),
    cases=(
        Case("first", "first copy (mirror into an empty destination)", tools.MIRROR, "empty",
             _MIRROR_TOOLS),
        Case("changed", "1% of files changed", tools.MIRROR, "changed", _MIRROR_TOOLS, (
            Target("at least 1.2x faster than rsync -a --delete", "ratio_min", 1.2, "rsync"),
        )),
        Case("unchanged", "nothing changed", tools.MIRROR, "unchanged", _MIRROR_TOOLS,
             ttfb=False),
    ),
    mutates_source=True,
))

_register(Workload(
    key="nochange",
    title="nothing-changed mirror of the small tree",
    specs=_specs(_small),
    cases=(Case("unchanged", "nothing changed", tools.MIRROR, "unchanged", _MIRROR_TOOLS, (
        Target("at least 1.2x faster than rsync -a --delete", "ratio_min", 1.2, "rsync"),
    ), ttfb=False),),
))

_register(Workload(
    key="huge",
    title="huge tree of empty files (memory and time to first byte)",
    specs=_specs(_huge),
    cases=(_fresh_copy((
        Target("first file lands within 1 s of the start", "ttfb_max", 1.0),
        Target("peak RSS under 150 MiB", "rss_max", 150 * MiB),
    ), optional_peers=True),),
    max_runs=3,
))

# -- remote: through a daemon on 127.0.0.1 ------------------------------------------------


def _remote_session(root: str, blit: str) -> ContextManager[object]:
    return daemons.session(root, blit)


def _push_pull(targets: tuple[Target, ...] = ()) -> tuple[Case, ...]:
    return (
        Case("push", "push (fresh copy to the daemon)", tools.COPY, "empty", tools.REMOTE,
             targets, direction="push"),
        Case("pull", "pull (fresh copy from the daemon)", tools.COPY, "empty", tools.REMOTE,
             targets, direction="pull"),
    )


_register(Workload(
    key="remote-small",
    title="small files through a daemon on loopback",
    specs=_specs(_small),
    cases=_push_pull((
        Target("at least 2x faster than rsync (daemon)", "ratio_min", 2.0, "rsync"),
    )),
    kind="remote",
    session=_remote_session,
))

_register(Workload(
    key="remote-nochange",
    title="nothing-changed mirror of the small tree, pushed to and pulled from a daemon on loopback",
    specs=_specs(_small),
    cases=tuple(Case(d, f"nothing changed (mirror {d})", tools.MIRROR, "unchanged",
                     tools.REMOTE, (
                         Target("faster than rsync -a --delete (daemon)", "ratio_gt", 1.0, "rsync"),
                     ), ttfb=False, direction=d) for d in ("push", "pull")),
    kind="remote",
    session=_remote_session,
))

_register(Workload(
    key="remote-large",
    title="one large file through a daemon on loopback",
    specs=_specs(_large),
    cases=_push_pull((
        Target("at least 1.5x faster than rsync (daemon)", "ratio_min", 1.5, "rsync"),
        Target("at least 40% of the loopback TCP limit (iperf3)", "link_min", 0.40),
    )),
    kind="remote",
    session=_remote_session,
))

_register(Workload(
    key="remote-mixed",
    title="mixed sizes through a daemon on loopback",
    specs=_specs(_mixed),
    cases=_push_pull(),
    kind="remote",
    session=_remote_session,
))

LOCAL_ORDER = ("small", "nochange", "large", "mixed", "incremental", "huge")
REMOTE_ORDER = ("remote-small", "remote-nochange", "remote-large", "remote-mixed")
DEFAULT_ORDER = LOCAL_ORDER + REMOTE_ORDER

DISK_TARGET = Target("not slower than rsync -a (disk, median of interleaved runs)",
                     "ratio_min", 1.0, "rsync")
