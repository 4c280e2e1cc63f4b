"""The benchmark harness (bench/) still runs: smoke mode end to end, TTFB, cleanup on interrupt.

These run ``python -m bench`` as a user would, on tiny trees in /dev/shm, with work roots of
their own so that they never touch a real bench run's data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import measure, trees  # noqa: E402
from bench.runner import MARKER  # noqa: E402

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"),
    reason="the bench needs Linux (inotify, /proc) and /dev/shm",
)

WORKLOADS = {
    "small": ["fresh copy"],
    "nochange": ["nothing changed"],
    "large": ["fresh copy"],
    "mixed": ["fresh copy"],
    "incremental": ["first copy", "1% of files changed", "nothing changed"],
    "huge": ["fresh copy"],
    "remote-small": ["push", "pull"],
    "remote-nochange": ["nothing changed (mirror push)", "nothing changed (mirror pull)"],
    "remote-large": ["push", "pull"],
    "remote-mixed": ["push", "pull"],
}
COPY_TOOLS = ["blit copy", "rsync -a", "cp -a", "tar pipe", "shutil.copytree"]
MIRROR_TOOLS = ["blit mirror", "rsync -a --delete"]
REMOTE_COPY_TOOLS = ["blit copy", "blit copy --no-tls", "rsync -a"]
REMOTE_MIRROR_TOOLS = ["blit mirror", "blit mirror --no-tls", "rsync -a --delete"]


def _root(name: str) -> Path:
    return Path(f"/dev/shm/blit-bench-test-{name}-{os.getpid()}")


def _bench(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, **kw,  # type: ignore[call-overload]
    )


def _sections(md: str) -> dict[str, str]:
    """Markdown text of each workload's section, keyed by workload."""
    parts = md.split("\n### ")[1:]
    return {p.split(":", 1)[0]: p for p in parts}


def test_smoke_run_reports_every_workload_and_peer_and_leaves_nothing(tmp_path: Path) -> None:
    root = _root("smoke")
    # Leftovers of a "crashed" run: the bench must wipe them on start.
    root.mkdir()
    (root / MARKER).write_text("")
    (root / "src").mkdir()
    (root / "src" / "stale").write_text("x")
    out = tmp_path / "smoke.md"
    t0 = time.monotonic()
    proc = _bench("--smoke", "--out", str(out), "--tmpfs-root", str(root))
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not root.exists(), "the work root must be removed at the end"
    assert elapsed < 60, f"smoke took {elapsed:.1f} s"

    md = out.read_text()
    assert md in proc.stdout  # printed as well as written
    sections = _sections(md)
    for workload, cases in WORKLOADS.items():
        assert workload in sections, f"no section for {workload}"
        for case in cases:
            assert f"**{case}" in sections[workload]
    for workload in ("small", "large", "mixed", "huge"):
        for tool in COPY_TOOLS:
            assert f"\n| {tool} |" in sections[workload], f"{tool} missing from {workload}"
    for workload in ("nochange", "incremental"):
        for tool in MIRROR_TOOLS:
            assert f"\n| {tool} |" in sections[workload], f"{tool} missing from {workload}"
    for workload in ("remote-small", "remote-large", "remote-mixed"):
        for tool in REMOTE_COPY_TOOLS:
            assert sections[workload].count(f"\n| {tool} |") == 2, f"{tool} in {workload}"
    for tool in REMOTE_MIRROR_TOOLS:
        assert f"\n| {tool} |" in sections["remote-nochange"], tool
    assert "## Machine" in md and "## Targets (issue 3)" in md
    # The daemons were stopped: nothing listens or runs from the work root any more.
    assert not _processes_mentioning(str(root)), _processes_mentioning(str(root))

    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["scale"] == "smoke"
    [loc] = doc["locations"]
    assert loc["where"] == "tmpfs"
    assert [w["workload"] for w in loc["workloads"]] == list(WORKLOADS)
    for w in loc["workloads"]:
        for c in w["cases"]:
            for t in c["tools"]:
                if not t["tool"].startswith("blit"):  # blit's failures are its tests' business
                    assert t["status"] == "ok" and t["median_s"] is not None, (w["workload"], t)
                elif t["status"] != "missing":
                    assert t["runs"], (w["workload"], t)
                if w["workload"].startswith("remote-") and t["status"] == "ok":
                    # the rsync daemon (or blit's) was measured beside the client
                    assert t["server_peak_rss_kib"] and t["server_cpu_median_s"] is not None, t
    if doc["machine"]["loopback"]["bits_per_second"] is None:  # iperf3 is optional
        assert "not installed" in doc["machine"]["loopback"]["note"]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd and pid != str(os.getpid()):
            found.append(cmd)
    return found


def test_ttfb_is_measured_from_command_start_to_first_complete_file(tmp_path: Path) -> None:
    root = _root("ttfb")
    trees.remove(str(root))
    root.mkdir()
    try:
        spec = trees.TreeSpec("t", files=100, file_size=4096, per_dir=50)
        src, dst = str(root / "src"), str(root / "run" / "dst")
        trees.generate(spec, src)
        (root / "run").mkdir()
        # A file the source does not have, then the real one, in a directory made later.
        script = (f"mkdir {dst}; sleep 0.3; echo x > {dst}/stranger; mkdir {dst}/d0001; "
                  f"sleep 0.2; cp {src}/d0001/f0003 {dst}/d0001/f0003; sleep 0.2")
        sample = measure.run(["sh", "-c", script], ttfb_src=src, ttfb_dst=dst)
        assert sample.exit_code == 0
        assert sample.ttfb_s is not None and 0.5 <= sample.ttfb_s < 0.65, sample
        assert sample.wall_s >= 0.7
        trees.remove(dst)
        sample = measure.run(["cp", "-a", src, dst], ttfb_src=src, ttfb_dst=dst)
        assert sample.ttfb_s is not None and sample.ttfb_s <= sample.wall_s
        assert trees.compare(src, dst, content=True) == []
    finally:
        trees.remove(str(root))


def _sigterm_when(proc: subprocess.Popen[str], ready: Callable[[], bool]) -> str:
    """SIGTERM the bench once `ready()` holds (within 60 s); its stderr once it has exited."""
    try:
        deadline = time.monotonic() + 60
        while not ready() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err


def test_interrupt_removes_generated_trees() -> None:
    root = _root("sigint")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--workloads", "huge", "--huge-peers",
         "--tools", "rsync", "--where", "tmpfs", "--tmpfs-root", str(root)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    err = _sigterm_when(proc, lambda: (root / "src").exists())
    assert proc.returncode in (130, 0), err
    assert not root.exists(), err


def test_refuses_to_wipe_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious").write_text("keep me")
    proc = _bench("--smoke", "--tmpfs-root", str(tmp_path))
    assert proc.returncode == 1
    assert "refusing to wipe" in proc.stderr
    assert (tmp_path / "precious").read_text() == "keep me"


def test_interrupt_stops_the_daemons_and_removes_their_modules() -> None:
    root = _root("sigint-remote")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--workloads", "remote-small", "--tools",
         "rsync", "--where", "tmpfs", "--tmpfs-root", str(root)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    err = _sigterm_when(proc, lambda: bool(_processes_mentioning(str(root / "daemons"))))
    assert proc.returncode in (130, 0), err
    assert not root.exists(), err
    assert not _processes_mentioning(str(root)), err


def test_a_second_report_in_the_same_minute_keeps_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime

    from bench import cli as bench_cli

    monkeypatch.setattr(bench_cli, "RESULTS", tmp_path)
    started = datetime.datetime(2026, 11, 21, 9, 54)
    first = bench_cli._results_path(started, ["tmpfs"], "full", ["small"])
    first.write_text("first run")
    second = bench_cli._results_path(started, ["tmpfs"], "full", ["small"])
    assert (first.name, second.name) == ("2026-11-21-0954-tmpfs.md", "2026-11-21-0954-tmpfs-2.md")
    second.write_text("second run")
    assert bench_cli._results_path(started, ["tmpfs"], "full", ["small"]).name == "2026-11-21-0954-tmpfs-3.md"
    assert first.read_text() == "first run"
