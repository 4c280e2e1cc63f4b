"""``python -m bench``: parse options, run, write the Markdown and JSON reports.

This module only wires things together; runner.py runs, report.py renders.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from bench import machine, measure, report, tools, watch
from bench.runner import BenchError, LocationResult, Runner, Settings, log
from bench.workloads import DEFAULT_ORDER, WORKLOADS

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
WHERES = ("tmpfs", "disk")


def _default_root(where: str, smoke: bool) -> str:
    if where == "tmpfs":
        return "/dev/shm/blit-bench-smoke" if smoke else "/dev/shm/blit-bench"
    return str(BENCH_DIR / "work" / ("smoke" if smoke else "main"))


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    return list(dict.fromkeys(items))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time blit beside rsync -a, cp -a, a tar pipe and shutil.copytree on the "
        "SPEC workloads, on tmpfs and on the disk, and write a Markdown report (plus a JSON "
        "twin) to bench/results/.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="reduced sizes (about a tenth), 1 run per tool unless --runs")
    size.add_argument("--smoke", action="store_true",
                      help="tiny trees, 1 run, tmpfs only, every peer; checks the harness in "
                      "seconds; writes no report unless --out")
    p.add_argument("--runs", type=int, metavar="N",
                   help="timed runs per tool and case (default 5 on tmpfs, 7 on disk; "
                   "the huge tree runs at most 3)")
    p.add_argument("--workloads", type=_csv, metavar="LIST", default=list(DEFAULT_ORDER),
                   help=f"comma-separated, from {','.join(DEFAULT_ORDER)} (default: all)")
    p.add_argument("--where", type=_csv, metavar="LIST", default=None,
                   help="tmpfs, disk or both, comma-separated (default tmpfs,disk; smoke: tmpfs)")
    p.add_argument("--tools", type=_csv, metavar="LIST", default=None,
                   help=f"only these tools, from {','.join(tools.EVERY)} (default: all)")
    p.add_argument("--huge-peers", action="store_true",
                   help="also run the peers on the huge tree (slow; blit only by default)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="write the Markdown here (JSON beside it, .json) instead of "
                   "bench/results/YYYY-MM-DD-HHMM-<where>.md")
    p.add_argument("--blit", default=tools.default_blit(), metavar="PATH",
                   help="blit executable under test (default: the one next to this Python)")
    p.add_argument("--tmpfs-root", metavar="DIR",
                   help="work root on tmpfs (default /dev/shm/blit-bench; smoke "
                   "/dev/shm/blit-bench-smoke); wiped at start, removed at the end")
    p.add_argument("--disk-root", metavar="DIR",
                   help="work root on the disk (default bench/work/main; smoke "
                   "bench/work/smoke); wiped at start, removed at the end")
    p.add_argument("--no-verify", action="store_true",
                   help="skip comparing each tool's first destination with the source")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a target fails or a row is INVALID or FAILED")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    return p


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _list(scale: str) -> None:
    for key in DEFAULT_ORDER:
        w = WORKLOADS[key]
        cases = ", ".join(c.key for c in w.cases)
        print(f"{key:16} {w.title}: {w.spec(scale).describe()} [{cases}]")


def _results_path(started: datetime.datetime, wheres: list[str], scale: str,
                  workloads: list[str]) -> Path:
    suffix = "" if scale == "full" else f"-{scale}"
    if all(WORKLOADS[w].kind == "remote" for w in workloads):
        suffix = "-remote" + suffix
    stem = f"{started:%Y-%m-%d-%H%M}-{'-'.join(wheres)}{suffix}"
    path, n = RESULTS / f"{stem}.md", 2
    while path.exists() or path.with_suffix(".json").exists():  # two runs in one minute
        path, n = RESULTS / f"{stem}-{n}.md", n + 1
    return path


def _failed(locations: list[LocationResult]) -> list[str]:
    bad = []
    for loc in locations:
        for w in loc.workloads:
            for c in w.cases:
                for t in c.tools:
                    if t.status in ("INVALID", "FAILED"):
                        bad.append(f"{loc.where} {w.workload.key}/{c.case.key} {t.label}: "
                                   f"{t.status}")
                for tr in c.targets:
                    if tr.status == "FAIL":
                        bad.append(f"{loc.where} {w.workload.key}/{c.case.key}: {tr.text}: FAIL")
    return bad


def _compile_blit() -> None:
    """Time blit as installed, with its bytecode: an editable install under
    PYTHONDONTWRITEBYTECODE=1 would otherwise recompile every module on every run."""
    import subprocess
    import sys

    try:
        import blit
    except ImportError:
        return
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.dirname(blit.__file__)], check=False)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    scale = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.list:
        _list(scale)
        return 0
    wheres = args.where or (["tmpfs"] if args.smoke else list(WHERES))
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    unknown += [w for w in wheres if w not in WHERES]
    unknown += [t for t in (args.tools or []) if t not in tools.EVERY]
    if unknown:
        log(f"bench: error: unknown name(s): {', '.join(unknown)} (see --help)")
        return 2
    if args.runs is not None and args.runs < 1:
        log("bench: error: --runs must be at least 1")
        return 2
    missing = [t for t in ("rsync", "cp", "tar", "bash", "rm") if shutil.which(t) is None]
    if missing:
        log(f"bench: error: {', '.join(missing)} not found (apt-get install -y rsync tar)")
        return 1
    if not watch.available():
        log("bench: error: inotify is not available; time to first byte cannot be measured")
        return 1
    _compile_blit()
    roots = {
        "tmpfs": args.tmpfs_root or _default_root("tmpfs", args.smoke),
        "disk": args.disk_root or _default_root("disk", args.smoke),
    }
    roots = {w: os.path.abspath(roots[w]) for w in wheres}
    settings = Settings(
        workloads=args.workloads,
        wheres=wheres,
        roots=roots,
        scale=scale,
        runs=args.runs,
        tools=set(args.tools) if args.tools else None,
        huge_peers=args.huge_peers,
        blit=os.path.abspath(args.blit) if os.sep in args.blit else
        (shutil.which(args.blit) or args.blit),
        verify=not args.no_verify,
    )
    command = "python -m bench" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

    # Also SIGINT: a shell starts background jobs with it ignored, and Ctrl-C must still work.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)

    runner = Runner(settings)
    if not runner.blit_ok:
        log(f"bench: {settings.blit} not found: running the peers only "
            "(pip install -e . puts blit in the venv)")
    info = machine.describe(settings.blit, REPO, roots)
    info["rss_floor_kib"] = measure.rss_floor_kib()
    started = datetime.datetime.now()
    t0 = time.perf_counter()
    interrupted, error = False, None
    try:
        runner.run()
    except KeyboardInterrupt:
        interrupted = True
        log("bench: interrupted; generated trees removed")
    except BenchError as exc:
        error = str(exc)
        log(f"bench: error: {exc}")
    try:
        (BENCH_DIR / "work").rmdir()  # the default disk roots' parent, when nothing else is there
    except OSError:
        pass
    info["loadavg_end"] = machine.loadavg()
    if runner.link is not None:
        info["loopback"] = runner.link.to_json()
    run = report.Run(
        command=command,
        scale=scale,
        started=f"{started:%Y-%m-%d %H:%M}",
        duration_s=time.perf_counter() - t0,
        machine=info,
        locations=runner.results,
        interrupted=interrupted,
        error=error,
    )
    text = report.markdown(run)
    print(text)
    out: Path | None = args.out
    if out is None and scale != "smoke" and not interrupted and error is None:
        out = _results_path(started, wheres, scale, args.workloads)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(report.as_json(run))
        log(f"bench: wrote {out} and {out.with_suffix('.json').name}")
    if interrupted:
        return 130
    if error is not None:
        return 1
    if args.strict:
        bad = _failed(runner.results)
        for line in bad:
            log(f"bench: {line}")
        return 1 if bad else 0
    return 0
