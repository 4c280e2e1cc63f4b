"""Remote to remote through the real `blit` command between two real `blit daemon` processes on
127.0.0.1: what lands, the exit codes, and the one-line messages."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import DaemonProcess, blit_cmd, run_daemon_process
from .treeutil import assert_same_tree, make_full_tree

AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def blit(b: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """The client, with its own HOME (known_hosts) beside B's files."""
    return subprocess.run([*blit_cmd(), *args], env=b.env, capture_output=True, text=True, timeout=120)


def stderr_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without the note of the first connection pinning B's certificate."""
    return [ln for ln in r.stderr.splitlines() if not ln.startswith("pinned the TLS certificate of")]


def ep(d: DaemonProcess, path: str) -> str:
    return f"127.0.0.1:{d.port}:/{path}"


def below(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    with run_daemon_process(tmp_path / "A") as a, run_daemon_process(tmp_path / "B", peer_pull=True) as b:
        yield a, b


def test_cli_copies_and_mirrors_between_two_daemons(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    a, b = daemons
    src = a.modules["data"] / "src"
    make_full_tree(src)
    r = blit(b, "copy", ep(a, "data/src/"), ep(b, "data/dst"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("copied "), r.stdout
    dst = b.modules["data"] / "dst"
    assert_same_tree(src, dst)
    (dst / "extra").write_text("only on B")
    (src / "small.txt").unlink()
    r = blit(b, "mirror", ep(a, "data/src/"), ep(b, "data/dst/"))
    assert r.returncode == 0, r.stderr
    assert "deleted 2" in r.stdout, r.stdout
    assert_same_tree(src, dst)


def test_cli_refusals_are_one_line_with_exit_codes(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    a, b = daemons
    (a.modules["data"] / "f").write_text("x")
    cases = [
        # B refuses: no consent (names the module and the key), read-only, unknown module.
        ((ep(a, "data/"), ep(b, "other/x")), 1,
         "blit: error: module 'other' does not accept remote to remote transfers "
         "(the daemon's config needs allow_peer_pull = true in that [[module]] table)"),
        ((ep(a, "data/"), ep(b, "ro/x")), 1, "blit: error: module 'ro' is read-only"),
        ((ep(a, "data/"), ep(b, "nope/x")), 1, "blit: error: unknown module 'nope' (modules: data, ro, other)"),
        ((ep(a, "nope/"), ep(b, "data/x")), 1,
         f"blit: error: the source daemon 127.0.0.1:{a.port} refused: unknown module 'nope' (modules: data, ro, other)"),
        ((ep(a, "data/missing"), ep(b, "data/x")), 2, f"blit: error: source does not exist: {ep(a, 'data/missing')}"),
    ]
    for (src, dst), code, line in cases:
        r = blit(b, "copy", src, dst)
        assert (r.returncode, stderr_lines(r)) == (code, [line]), r.stderr
        assert r.stdout == ""
    r = blit(b, "move", ep(a, "data/f"), ep(b, "data/f"))
    assert r.returncode == 2 and stderr_lines(r) == [
        "blit: error: move between two daemons is not supported yet (copy, then delete the source)"
    ], r.stderr
    for m in ("data", "other", "ro"):
        assert below(b.modules[m]) == set(), m
    assert (a.modules["data"] / "f").read_text() == "x"


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the source daemon as nobody, which needs root")
def test_mirror_deletes_nothing_on_b_when_a_cannot_read_everything(tmp_path: Path, nobody_tmp: Path) -> None:
    """A (running as nobody) cannot open one source directory: B copies what it can and deletes
    none of its extras, and the client says so (exit 3)."""
    a_dir = nobody_tmp / "A"
    a_dir.mkdir()
    os.chown(a_dir, 65534, 65534)
    with run_daemon_process(a_dir, prefix=AS_NOBODY) as a, run_daemon_process(tmp_path / "B", peer_pull=True) as b:
        src = a.modules["data"] / "src"
        (src / "locked").mkdir(parents=True)
        (src / "locked" / "secret").write_text("s")
        (src / "new.txt").write_text("new")
        os.chmod(src / "locked", 0)
        dst = b.modules["data"] / "dst"
        (dst / "locked").mkdir(parents=True)
        (dst / "locked" / "stale").write_text("kept")
        (dst / "extra.txt").write_text("kept")
        r = blit(b, "mirror", ep(a, "data/src/"), ep(b, "data/dst/"))
        assert r.returncode == 3, (r.stdout, r.stderr, a.log())
        lines = stderr_lines(r)
        assert any(ln.startswith("blit: locked: open: ") and "permission denied" in ln.lower() for ln in lines), lines
        assert any(ln.startswith("blit: mirror deleted nothing: 1 source directory could not be read") for ln in lines), lines
        assert (dst / "new.txt").read_text() == "new"
        assert (dst / "extra.txt").read_text() == "kept" and (dst / "locked" / "stale").read_text() == "kept"
        os.chmod(src / "locked", 0o755)
