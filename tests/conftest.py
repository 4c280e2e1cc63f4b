"""Shared fixtures: a private HOME for every blit run, scratch space for unprivileged runs,
root-only tests, and a check that no blit process outlives its test."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import BLIT, NOBODY, is_root, rmtree, set_blit_home


@pytest.fixture(scope="session", autouse=True)
def _private_blit_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep blit's run history and config of test runs out of the real user's directories."""
    set_blit_home(tmp_path_factory.mktemp("home"))


@pytest.fixture(autouse=True)
def _root_marker(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("root") and not is_root():
        pytest.skip("needs root (CI runs the suite as root)")


@pytest.fixture
def blit_exe() -> str:
    assert os.access(BLIT, os.X_OK), (
        f"no blit console script at {BLIT}; install the project: pip install -e '.[test]'"
    )
    return BLIT


@pytest.fixture
def nobody_tmp() -> Iterator[Path]:
    """A scratch directory the unprivileged user nobody can reach and write.

    pytest's tmp_path lives under a 0700 directory of root's, so runs that drop privileges get
    their own directory in /tmp (0755, owned by nobody), removed afterwards. HOME for those runs
    points inside it.
    """
    if not is_root():
        pytest.skip("dropping privileges to nobody needs root")
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed to run blit as nobody"
    d = Path(tempfile.mkdtemp(prefix="blit-test-nobody-", dir="/tmp"))
    os.chmod(d, 0o755)
    os.chown(d, NOBODY, NOBODY)
    try:
        yield d
    finally:
        rmtree(d)


@pytest.fixture(autouse=True)
def _no_leftover_blit(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a local-engine test that leaves a blit child process of ours running; kill it.

    Only direct children of this pytest process are looked at (blit run through setpriv keeps
    the pid setpriv had), so concurrent test runs never touch each other's processes.
    """
    yield
    name = request.node.module.__name__ if request.node.module else ""
    if not name.startswith(("test_local_", "test_cli_")):
        return
    mine = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{pid}/stat").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat_line.rsplit(b")", 1)[1].split()
        if fields[0] != b"Z" and int(fields[1]) == os.getpid() and any(
            a.endswith(b"/blit") for a in cmdline[:6]
        ):
            mine.append(int(pid))
    for pid in mine:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert not mine, f"blit processes outlived the test: {mine}"


def pytest_report_header() -> list[str]:
    rsync = subprocess.run(["rsync", "--version"], capture_output=True, text=True)
    first = rsync.stdout.splitlines()[0] if rsync.returncode == 0 else "rsync: not installed"
    return [f"blit: {BLIT}", f"oracle: {first}", f"euid: {os.geteuid()}"]
