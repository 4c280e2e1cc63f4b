"""Remote to remote through the real `blit` command between two real `blit daemon` processes on
127.0.0.1: what lands, the exit codes, and the one-line messages."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import DaemonProcess, blit_cmd, run_daemon_process
from .treeutil import assert_same_tree, make_full_tree, snapshot

AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def blit(b: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """The client, with its own HOME (known_hosts) beside B's files."""
    return subprocess.run([*blit_cmd(), *args], env=b.env, capture_output=True, text=True, timeout=120)


def stderr_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without the note of the first connection pinning B's certificate."""
    return [ln for ln in r.stderr.splitlines() if not ln.startswith("blit: pinned the TLS certificate of")]


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
    # A move is refused the same ways, and removes nothing from A.
    for (src, dst), code, line in cases[:2]:
        r = blit(b, "move", src, dst)
        assert (r.returncode, stderr_lines(r)) == (code, [line]), r.stderr
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


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the source daemon as nobody, which needs root")
@pytest.mark.parametrize("what", ["dir", "dir contents", "file"])
def test_a_source_root_a_cannot_read_ends_the_run_with_one_line(tmp_path: Path, nobody_tmp: Path, what: str) -> None:
    """As a pull from A into a local directory does (R69): the named source A cannot read ends
    the run before B makes anything, exit 1, `cannot read source A:/...: Permission denied`."""
    a_dir = nobody_tmp / "A"
    a_dir.mkdir()
    os.chown(a_dir, 65534, 65534)
    with run_daemon_process(a_dir, prefix=AS_NOBODY) as a, run_daemon_process(tmp_path / "B", peer_pull=True) as b:
        src = a.modules["data"] / "src"
        src.mkdir()
        (src / "f").write_text("f")
        locked = src / "f" if what == "file" else src
        os.chmod(locked, 0)
        try:
            arg = ep(a, "data/src" + {"dir": "", "dir contents": "/", "file": "/f"}[what])
            for op in ("copy", "mirror"):
                r = blit(b, op, arg, ep(b, "data/dst/"))
                assert r.returncode == 1, (r.stdout, r.stderr, a.log())
                assert stderr_lines(r) == [f"blit: error: cannot read source {arg}: Permission denied"], r.stderr
                assert not (b.modules["data"] / "dst").exists()
        finally:
            os.chmod(locked, 0o755 if locked == src else 0o644)


# --- move: B's pull is a pull move, A removes what landed on B ------------------------------------

COUNTS = ("files_copied", "bytes_copied", "files_skipped", "dirs_created", "links_created", "files_removed", "failures", "exit_code")


def summary(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """The --json summary event (the last line)."""
    event = json.loads(r.stdout.splitlines()[-1])
    assert event["event"] == "summary", r.stdout
    return {k: event[k] for k in COUNTS}


@pytest.mark.parametrize("form", ["/", ""], ids=["SRC-slash", "SRC"])
def test_move_between_two_daemons_removes_what_a_pull_move_removes(
    daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path, form: str
) -> None:
    """A tree with every kind of entry lands on B exactly as it was on A; A is left as a pull
    move of an identical tree into a local directory leaves it (the oracle), with the same
    counts and exit code."""
    a, b = daemons
    src, twin = a.modules["data"] / "src", a.modules["data"] / "twin"
    make_full_tree(src)
    make_full_tree(twin)
    want, top = snapshot(src), os.stat(src)
    r = blit(b, "move", "--json", ep(a, "data/src" + form), ep(b, "data/dst"))
    assert r.returncode == 0, (r.stdout, r.stderr, b.log())
    oracle = blit(b, "move", "--json", ep(a, "data/twin" + form), str(tmp_path / "local" / "dst"))
    assert oracle.returncode == 0, (oracle.stdout, oracle.stderr)
    got = summary(r)
    assert got == summary(oracle)
    assert got["files_removed"] == sum(1 for v in want.values() if v[0] != 0o040000)  # all but directories
    dst = b.modules["data"] / "dst"
    assert snapshot(dst) == want
    assert (os.stat(dst).st_mode, os.stat(dst).st_mtime_ns) == (top.st_mode, top.st_mtime_ns)
    assert [p for p in dst.rglob(".blit-*")] == []
    # `SRC/`: SRC stays, emptied; `SRC`: it goes too.
    assert (src.exists(), twin.exists()) == (form == "/", form == "/")
    if form == "/":
        assert below(src) == below(twin) == set()


def test_move_between_two_daemons_keeps_on_a_what_failed_to_land_on_b(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    """`x` cannot replace a non-empty directory on B: it stays on A (and so does its
    directory), everything else moves; exit 3 with the failure's line."""
    a, b = daemons
    src = a.modules["data"] / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "x").write_text("cannot land")
    (src / "ok").write_text("ok")
    (src / "sub" / "y").write_text("y")
    os.symlink("ok", src / "link")
    out = b.modules["data"] / "out"
    (out / "x").mkdir(parents=True)
    (out / "x" / "keep").write_text("in the way")
    r = blit(b, "move", ep(a, "data/tree/"), ep(b, "data/out"))
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert stderr_lines(r) == ["blit: x: replace: directory not empty (mirror replaces it)"], r.stderr
    assert r.stdout.startswith("moved 2 files (3 B), 1 link, removed 3 from the source, skipped 0, 1 failed"), r.stdout
    assert below(src) == {"x"} and (src / "x").read_text() == "cannot land"
    assert (out / "ok").read_text() == "ok" and (out / "sub" / "y").read_text() == "y"
    assert os.readlink(out / "link") == "ok"
    assert (out / "x" / "keep").read_text() == "in the way"


def test_move_from_a_read_only_module_of_a_changes_nothing(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    a, b = daemons
    (a.modules["ro"] / "tree").mkdir()
    (a.modules["ro"] / "tree" / "f").write_text("stays")
    for dst in ("data/out", "data/new/deeper/"):  # B would have to create its base: it does not
        r = blit(b, "move", ep(a, "ro/tree"), ep(b, dst))
        assert (r.returncode, stderr_lines(r)) == (1, [
            f"blit: error: the source daemon 127.0.0.1:{a.port} refused: module 'ro' is read-only:"
            " a move from it would remove its files (copy instead)"
        ]), r.stderr
        assert r.stdout == ""
    assert (a.modules["ro"] / "tree" / "f").read_text() == "stays" and below(a.modules["ro"]) == {"tree", "tree/f"}
    assert below(b.modules["data"]) == set()


def test_move_between_two_daemons_dry_run_changes_nothing(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    a, b = daemons
    src = a.modules["data"] / "src"
    make_full_tree(src)
    (b.modules["data"] / "have").mkdir()
    (b.modules["data"] / "have" / "small.txt").write_text("stale")
    before_a, before_b = snapshot(a.modules["data"]), snapshot(b.modules["data"])
    for s, d in ((ep(a, "data/src/"), ep(b, "data/new")), (ep(a, "data/src"), ep(b, "data/have/"))):
        r = blit(b, "move", "--dry-run", "--json", s, d)
        assert r.returncode == 0, (r.stdout, r.stderr)
        event = json.loads(r.stdout.splitlines()[-1])
        assert event["dry_run"] and event["files_copied"] == 10 and event["files_removed"] == 0, event
    assert snapshot(a.modules["data"]) == before_a
    assert snapshot(b.modules["data"]) == before_b


def test_move_within_one_daemon_refuses_the_same_or_a_nested_destination(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    """A and B the same daemon: moving a tree onto itself or into itself is refused (exit 2),
    nothing changes; beside itself it moves."""
    _a, b = daemons
    mod = b.modules["data"]
    (mod / "x" / "sub").mkdir(parents=True)
    (mod / "x" / "sub" / "f").write_text("f")
    for s, d, why in (
        (ep(b, "data/x/"), ep(b, "data/x/sub/in"), f"blit: error: destination /data/x/sub/in is inside the source {ep(b, 'data/x/')}"),
        (ep(b, "data/x"), ep(b, "data/x"), f"blit: error: destination /data/x is inside the source {ep(b, 'data/x')}"),
        (ep(b, "data/x/"), ep(b, "data/x/"), f"blit: error: source and destination are the same: {ep(b, 'data/x/')}"),
    ):
        r = blit(b, "move", s, d)
        assert (r.returncode, stderr_lines(r)) == (2, [why]), r.stderr
    assert below(mod) == {"x", "x/sub", "x/sub/f"}
    r = blit(b, "move", ep(b, "data/x"), ep(b, "data/y"))
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert below(mod) == {"y", "y/sub", "y/sub/f"} and (mod / "y" / "sub" / "f").read_text() == "f"


def test_the_source_daemon_checks_the_address_of_the_client_a_pull_is_for(tmp_path: Path) -> None:
    """A's module `other` admits 127.0.0.1 only. The client talks to B over ::1; B pulls from
    A over 127.0.0.1. A saw B's address only, so the client read through B what A refuses it;
    now B names its client's address (tree/open `client`) and A's rules must admit it too."""
    with run_daemon_process(tmp_path / "A", module_extra={"other": 'hosts_allow = ["127.0.0.1"]'}) as a, run_daemon_process(
        tmp_path / "B", peer_pull=True, bind="::1"
    ) as b:
        (a.modules["other"] / "secret.txt").write_text("for 127.0.0.1 only")
        (a.modules["data"] / "open.txt").write_text("for anyone")
        to_b = f"[::1]:{b.port}:/data/"
        r = blit(b, "copy", f"127.0.0.1:{a.port}:/other/secret.txt", to_b)
        assert r.returncode == 1, (r.stdout, r.stderr, a.log())
        assert stderr_lines(r)[-1].endswith("access to module 'other' denied for ::1"), stderr_lines(r)
        assert not (b.modules["data"] / "secret.txt").exists()
        # B's stat of the source (before tree/open) named its client too: the answer is the
        # same for paths that exist, that do not, and of every kind, and the unknown-module
        # line lists no module the client may not use (QA: a missing path said "source does
        # not exist", `secret.txt/` "is not a directory", and `nosuch` "(modules: data, other, ro)").
        (a.modules["other"] / "dir").mkdir()
        for path in ("missing", "secret.txt/", "dir/", "missing/x"):
            r = blit(b, "copy", f"127.0.0.1:{a.port}:/other/{path}", to_b)
            assert (r.returncode, stderr_lines(r)[-1:]) == (1, [f"blit: error: the source daemon 127.0.0.1:{a.port} refused: access to module 'other' denied for ::1"]), (path, r.stderr)
        r = blit(b, "copy", f"127.0.0.1:{a.port}:/nosuch/", to_b)
        assert stderr_lines(r)[-1].endswith("unknown module 'nosuch' (modules: data, ro)"), r.stderr
        r = blit(b, "copy", f"127.0.0.1:{a.port}:/data/open.txt", to_b)  # a module without rules: as before
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert (b.modules["data"] / "open.txt").read_text() == "for anyone"


@pytest.mark.root
@pytest.mark.parametrize("flags", [[], ["-I"]], ids=["", "ignore times"])
def test_a_move_between_two_daemons_serving_one_directory_keeps_everything(daemons: tuple[DaemonProcess, DaemonProcess], flags: list[str]) -> None:
    """B's module is A's by a bind mount. Onto the same directory or into it, B refuses (exit 2,
    nothing changed): it sees the source is on its machine and compares directories by device
    and inode (R52); before, a move onto it removed every file, and a copy into it nested until
    killed. Onto hard links of the source's files, B found each up to date (it is A's) and A
    removed them all, the only copies; B now keeps an entry that is its own source (R51)."""
    a, b = daemons
    src = a.modules["data"] / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_text("f")
    (src / "sub" / "g").write_text("g")
    (src / "void").mkdir()
    (a.modules["data"] / "links" / "sub").mkdir(parents=True)
    for p in ("f", "sub/g"):
        os.link(src / p, a.modules["data"] / "links" / p)
    subprocess.run(["mount", "--bind", str(a.modules["data"]), str(b.modules["data"])], check=True)
    try:
        for s, d, why in (
            ("data/tree/", "data/tree/", f"source and destination are the same directory: {ep(a, 'data/tree/')} and /data/tree/"),
            ("data/tree", "data/tree/sub/", f"destination /data/tree/sub/ is inside the source {ep(a, 'data/tree')}"),
        ):
            r = blit(b, "move", *flags, ep(a, s), ep(b, d))
            assert (r.returncode, stderr_lines(r)) == (2, [f"blit: error: {why}"]), r.stderr
        r = blit(b, "move", *flags, ep(a, "data/tree/"), ep(b, "data/links/"))
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert all("source and destination are the same file" in ln for ln in stderr_lines(r)), r.stderr
        assert len(stderr_lines(r)) == 2, r.stderr
    finally:
        subprocess.run(["umount", str(b.modules["data"])], check=False)
    assert (src / "f").read_text() == "f" and (src / "sub" / "g").read_text() == "g"
