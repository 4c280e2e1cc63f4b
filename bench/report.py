"""Render a bench run as Markdown (for people) and JSON (for machines). No I/O but returning text."""

from __future__ import annotations

import json
from dataclasses import dataclass

from bench.runner import CaseResult, LocationResult, ToolResult
from bench.tools import ALL, COPY, MIRROR, REMOTE, Tools


@dataclass
class Run:
    """Everything a report needs."""

    command: str
    scale: str
    started: str  # local time, "YYYY-MM-DD HH:MM"
    duration_s: float
    machine: dict[str, object]
    locations: list[LocationResult]
    interrupted: bool = False
    error: str | None = None


def _secs(x: float | None) -> str:
    if x is None:
        return "—"
    if x < 10:
        return f"{x:.3f} s"
    return f"{x:.2f} s"


def _spread(t: ToolResult) -> str:
    sp = t.spread
    if sp is None:
        return "—"
    lo, hi = sp
    fmt = "{:.3f}" if hi < 10 else "{:.2f}"
    return f"{fmt.format(lo)}–{fmt.format(hi)} s"


def _mib(kib: int | None) -> str:
    return "—" if kib is None else f"{kib / 1024:.1f} MiB"


def _duration(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec} s" if m else f"{sec} s"


def _rss(t: ToolResult, floor: int) -> str:
    kib = t.peak_rss_kib
    if kib is not None and floor and kib <= floor + 256:
        return f"≤ {_mib(floor)} (floor)"
    return _mib(kib)


def _cpu(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} s"


def _tool_row(case: CaseResult, t: ToolResult, floor: int) -> str:
    if t is case.blit:
        ratio = "1.00 (blit)"
    else:
        r = case.ratio(t.key)
        ratio = "—" if r is None else f"{r:.2f}x"
    ttfb = _secs(t.ttfb_median) if case.case.ttfb else "—"
    status = t.check if t.status in ("ok", "INVALID") else f"{t.status}: {t.check}"
    if t.notes:
        status += " (" + "; ".join(t.notes) + ")"
    remote = ""
    if case.case.direction is not None:
        remote = (f" {_cpu(t.cpu_median)} | {_cpu(t.server_cpu_median)} | "
                  f"{_mib(t.server_rss_kib)} |")
    return (f"| {t.label} | {_secs(t.median)} | {_spread(t)} | {ratio} | {_rss(t, floor)} "
            f"| {ttfb} |{remote} {status.replace('|', '/')} |")


def _start_text(case: CaseResult) -> str:
    return {
        "empty": "destination removed before each run",
        "changed": "destination restored to the prior copy before each run",
        "unchanged": "destination already an up-to-date copy",
    }[case.case.start]


def markdown(run: Run) -> str:
    m = run.machine
    floor = int(m.get("rss_floor_kib", 0) or 0)  # type: ignore[call-overload]
    wheres = ", ".join(loc.where for loc in run.locations) or "nothing"
    out: list[str] = []
    out.append(f"# Blit benchmark, {run.started} ({wheres})")
    out.append("")
    scale_note = {
        "full": "full SPEC sizes",
        "quick": "quick: reduced sizes, indicative only",
        "smoke": "smoke: tiny trees, checks the harness only; the figures mean nothing",
    }[run.scale]
    out.append(f"`{run.command}`: {scale_note}; took {_duration(run.duration_s)}.")
    if run.interrupted:
        out.append("")
        out.append("**Interrupted**: the results below are partial.")
    if run.error:
        out.append("")
        out.append(f"**Stopped by an error**: {run.error}")
    out.append("")
    out.append("## Machine")
    out.append("")
    out.append("| | |")
    out.append("|---|---|")
    ram = int(m.get("ram_bytes", 0) or 0)  # type: ignore[call-overload]
    out.append(f"| CPU | {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable) |")
    out.append(f"| RAM | {ram / 2**30:.1f} GiB |")
    out.append(f"| kernel | {m['kernel']} |")
    fss = m.get("filesystems", {})
    assert isinstance(fss, dict)
    for where, fs in fss.items():
        out.append(f"| {where} work root | `{fs['root']}`: {fs['type']} |")
    out.append(f"| load average (1, 5, 15 min) | at start {m.get('loadavg_start')}, "
               f"at end {m.get('loadavg_end', '?')} |")
    tools = m.get("tools", {})
    assert isinstance(tools, dict)
    out.append(f"| blit | {tools.get('blit')}; repository at {tools.get('repo')} |")
    out.append(f"| peers | {tools.get('rsync')}; {tools.get('cp')}; {tools.get('tar')}; "
               f"Python {m.get('python')}; {tools.get('bash')} |")
    loop = m.get("loopback")
    if isinstance(loop, dict):
        bps = loop.get("bits_per_second")
        text = (f"{bps / 1e9:.1f} Gbit/s ({bps / 8e9:.2f} GB/s), `{loop.get('command')}`, "
                f"once before the first location" if isinstance(bps, float)
                else f"not measured: {loop.get('note')}")
        out.append(f"| loopback TCP (iperf3) | {text} |")
    out.append("")

    out.append("## Targets (issue 3)")
    out.append("")
    rows = [(loc, w, c, tr) for loc in run.locations for w in loc.workloads
            for c in w.cases for tr in c.targets]
    if rows:
        out.append("| where | workload | case | target | result | status |")
        out.append("|---|---|---|---|---|---|")
        for loc, w, c, tr in rows:
            status = f"**{tr.status}**" if tr.status in ("PASS", "FAIL") else tr.status
            out.append(f"| {loc.where} | {w.workload.key} | {c.case.title} | {tr.text} "
                       f"| {tr.detail} | {status} |")
    else:
        out.append("No targets were evaluated in this run.")
    if run.scale != "full":
        out.append("")
        out.append(f"Sizes are reduced ({run.scale}): targets are judged on these figures but only "
                   "a full-size run counts.")
    out.append("")

    for loc in run.locations:
        out.append(f"## {loc.where}")
        out.append("")
        for w in loc.workloads:
            out.append(f"### {w.workload.key}: {w.workload.title}")
            out.append("")
            gen = f" (generated in {w.generate_s:.1f} s)" if w.generate_s is not None else \
                " (reused from the previous workload)"
            out.append(f"Source: {w.spec.describe()}{gen}.")
            out.append("")
            for c in w.cases:
                out.append(f"**{c.case.title}**: {c.runs} run{'s' if c.runs != 1 else ''} "
                           f"of each tool, interleaved; {_start_text(c)}.")
                for note in c.notes:
                    out.append(f"{note[0].upper()}{note[1:]}.")
                out.append("")
                if c.case.direction is not None:
                    out.append("| tool | median | min–max | peer/blit | peak RSS (client) "
                               "| TTFB (median) | client CPU | daemon CPU | daemon peak RSS "
                               "| check |")
                    out.append("|---|---|---|---|---|---|---|---|---|---|")
                else:
                    out.append("| tool | median | min–max | peer/blit | peak RSS "
                               "| TTFB (median) | check |")
                    out.append("|---|---|---|---|---|---|---|")
                for t in c.tools:
                    out.append(_tool_row(c, t, floor))
                out.append("")
                if c.targets:
                    parts = [f"{tr.text}: **{tr.status}** ({tr.detail})" for tr in c.targets]
                    out.append("Targets: " + "; ".join(parts) + ".")
                    out.append("")

    out.append("## Method")
    out.append("")
    out.append("| tool | fresh copy | mirror |")
    out.append("|---|---|---|")
    shown = Tools("blit")
    for key in ALL:
        mirror = shown.shown(key, MIRROR) if key in ("blit", "rsync") else ""
        copy = shown.shown(key, COPY).replace("|", "\\|")  # a pipe inside a table cell
        out.append(f"| {key} | `{copy}` | {f'`{mirror}`' if mirror else '—'} |")
    out.append("")
    if any(w.workload.kind == "remote" for loc in run.locations for w in loc.workloads):
        out.append("Remote workloads (through daemons on 127.0.0.1, started once per location; "
                   "the module `mod` is the work root, on the location's filesystem):")
        out.append("")
        out.append("| tool | push | pull | mirror push |")
        out.append("|---|---|---|---|")
        for key in REMOTE:
            push, pull = shown.shown(key, COPY, "push"), shown.shown(key, COPY, "pull")
            mpush = shown.shown(key, MIRROR, "push")
            out.append(f"| {key} | `{push}` | `{pull}` | `{mpush}` |")
        out.append("")
        out.append(
            "- **daemons**: `blit daemon --config FILE --no-mdns` (TLS on; the client pins its "
            "certificate in a temporary HOME), `blit daemon --config FILE --no-mdns --no-tls`, "
            "and `rsync --daemon --no-detach --config=FILE` (use chroot = no, numeric ids, no "
            "reverse lookup, the bench's uid), each exporting the work root as one writable "
            "module.\n"
            "- **client CPU**: user + system time of the command (`wait4`); **daemon CPU**: "
            "growth of the daemon's utime + stime + cutime + cstime over the run (rsync's "
            "per-connection children counted once reaped); **daemon peak RSS**: peak of the "
            "summed RSS of the daemon's session sampled every 50 ms (a blit daemon lives across "
            "runs, so this includes its resident size between runs); medians and maxima over "
            "the runs.\n"
            "- **loopback TCP**: `iperf3 -s -B 127.0.0.1 -1` and `iperf3 -c 127.0.0.1 -t 3` "
            "once per bench run; the large-file target compares blit's rate (file size / "
            "median wall time, start-up included) with the receiver's rate iperf3 reports.")
        out.append("")
    out.append(
        "- **median, min–max**: wall time from spawning the command to reaping it, over the runs "
        "that exited 0. Runs are interleaved (run 1 of every tool, then run 2, ...); the "
        "destination is prepared before each run outside the timing, and on the disk `sync` "
        "runs before each timed run. A fresh-copy case first makes and removes one untimed "
        "`cp -a` copy, so that the first tool does not pay alone for cold caches and the "
        "kernel's first allocation of the destination's pages.\n"
        "- **peer/blit**: the row's median divided by blit's; above 1 means blit is faster. "
        "In remote cases the base is blit with TLS (the default); the `--no-tls` row's figure "
        "below 1 is what TLS costs, and the case notes give rsync against it too.\n"
        "- **peak RSS**: the larger of `ru_maxrss` from `wait4` (the largest single process "
        "among the command and the descendants it reaped) and the peak of the summed RSS of "
        "every process in the command's session, sampled from /proc every 50 ms; the largest "
        "over the runs. Commands start through a bare Python launcher (bench/_spawn.py), and a "
        "process that forks and execs keeps its parent's resident size in `ru_maxrss`: "
        f"`true` measures {_mib(floor)} here, so smaller figures show as \"≤ floor\".\n"
        "- **TTFB**: time from spawning the command to the first regular file appearing "
        "complete under its final name in the destination (inotify: IN_CREATE, IN_MOVED_TO or "
        "IN_CLOSE_WRITE of a file whose size matches the source's); median over the runs.\n"
        "- **check**: after each tool's first run its destination is compared with the source: "
        "for blit every byte and names, types, sizes, permission bits, owner, group, mtimes in "
        "nanoseconds (files and directories) and symlink targets; for peers the same without "
        "reading contents. A tree that differs in structure, size or content (or, for blit, in "
        "anything) is INVALID. GNU tar's default format keeps whole-second mtimes, which shows "
        "as a metadata difference for the tar pipe.")
    out.append("")
    return "\n".join(out)


def as_json(run: Run) -> str:
    doc = {
        "format": "blit-bench/1",
        "command": run.command,
        "scale": run.scale,
        "started": run.started,
        "duration_s": round(run.duration_s, 3),
        "interrupted": run.interrupted,
        "error": run.error,
        "machine": run.machine,
        "locations": [loc.to_json() for loc in run.locations],
    }
    return json.dumps(doc, indent=2, default=str) + "\n"
