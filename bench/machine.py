"""Describe the machine and the tools a run was taken with (read-only; runs no benchmark)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0].strip() if text else f"exit {out.returncode}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding ``path`` (longest matching mount point)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return f"{kind} (mounted at {best})" if best else kind


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def repo_revision(repo: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "no commit"
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def blit_version(blit: str) -> str:
    if not (os.path.isfile(blit) and os.access(blit, os.X_OK)):
        return f"not installed ({blit})"
    try:
        from importlib.metadata import version
        return f"blit {version('blit')} ({blit})"
    except Exception:
        return blit


def describe(blit: str, repo: Path, roots: dict[str, str]) -> dict[str, object]:
    uname = platform.uname()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        usable = os.cpu_count() or 0
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "ram_bytes": mem_total_bytes(),
        "kernel": f"{uname.system} {uname.release} {uname.machine}",
        "python": sys.version.split()[0],
        "filesystems": {where: {"root": root, "type": fs_type(root)}
                        for where, root in roots.items()},
        "tools": {
            "blit": blit_version(blit),
            "repo": repo_revision(repo),
            "rsync": _first_line(["rsync", "--version"]),
            "cp": _first_line(["cp", "--version"]),
            "tar": _first_line(["tar", "--version"]),
            "bash": _first_line(["bash", "--version"]),
            "iperf3": _first_line(["iperf3", "--version"]),
        },
        "loadavg_start": loadavg(),
    }
