"""-v / --dry-run / --json action lines of remote runs (decisions R23): push, pull and remote to
remote list exactly what a local run of the same trees lists, the real run lists what it then
changes, and a plain run asks the daemon for nothing. Real `blit` and `blit daemon` processes
on 127.0.0.1, except the wire checks, which use an in-process daemon."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import assert_one_branch, cp_a, schema_matches

from .conftest import Daemon, DaemonProcess, blit_cmd, run_daemon_process
from .treeutil import assert_same_tree, make_full_tree

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "schemas" / "events.schema.json").read_text())


# --- the JSON schema of events -------------------------------------------------------------------


def assert_valid_event(event: dict[str, Any]) -> None:
    """Exactly one branch of schemas/events.schema.json accepts the event."""
    assert_one_branch(SCHEMA, event)


def test_the_schema_check_refuses_what_the_schema_refuses() -> None:
    assert_valid_event({"event": "action", "action": "delete", "path": "a/\udcff"})
    for bad in ({"event": "action", "action": "remove", "path": "a"}, {"event": "action", "action": "copy"}, {"event": "action", "action": "copy", "path": 3}):
        assert not any(schema_matches(bad, b) for b in SCHEMA["oneOf"]), bad


# --- running blit ---------------------------------------------------------------------------------


def blit(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*blit_cmd(), *args], env=d.env, capture_output=True, text=True, timeout=180)


def actions_of(r: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
    """The action events of a --json run (sorted), every event checked against the schema."""
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    for e in events:
        assert_valid_event(e)
    assert events[-1]["event"] == "summary" and events[-1]["failures"] == [], events[-1]
    return sorted((e["action"], e["path"]) for e in events if e["event"] == "action")


def lines_of(r: subprocess.CompletedProcess[str]) -> list[str]:
    """The action lines of a -v / -n run (sorted), without the summary line."""
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr)
    out = r.stdout.splitlines()
    assert out and ("copied" in out[-1]), out[-1:]
    return sorted(out[:-1])


@pytest.fixture
def daemon_p(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A real daemon whose module `data` may pull from other daemons (from itself, here)."""
    with run_daemon_process(tmp_path / "daemon", peer_pull=True) as d:
        yield d


def ep(d: DaemonProcess, path: str) -> str:
    return f"127.0.0.1:{d.port}:/{path}"


def stale_copy(src: Path, dst: Path) -> None:
    """`dst`: a copy of `src` that a mirror must change in every way it can: a missing file in a
    deep directory, a file of another size, a missing directory, symlink, FIFO and hard link,
    extras (a file, a directory with contents, one in a subdirectory), a directory where the
    source has a file, and a stale temporary."""
    cp_a(src, dst)
    (dst / "a" / "b" / "c" / "deep.txt").unlink()
    (dst / "exec.sh").write_text("#!/bin/sh\necho changed\n")
    (dst / "emptydir").rmdir()
    (dst / "rel-link").unlink()
    (dst / "fifo").unlink()
    (dst / "a" / "hard-other-dir").unlink()
    (dst / "extra.txt").write_text("not in the source")
    (dst / "olddir" / "deeper").mkdir(parents=True)
    (dst / "olddir" / "deeper" / "z").write_text("z")
    (dst / "a" / "extra-in-sub").write_text("x")
    (dst / "mode600").unlink()
    (dst / "mode600" / "inside").mkdir(parents=True)
    # An interrupted run's temporary: removed without a line, and a dry run does not name it
    # either (QA: it announced a deletion the real run does not report).
    (dst / "a" / ".blit-0123456789abcdef.tmp").write_text("stale")


@pytest.mark.parametrize("direction", ["push", "pull", "relay"])
def test_mirror_lists_exactly_what_changes_as_a_local_run_does(daemon_p: DaemonProcess, tmp_path: Path, direction: str) -> None:
    d = daemon_p
    mods = d.modules
    if direction == "push":
        src, dst = tmp_path / "src", mods["data"] / "dst"
        a, b = f"{src}/", ep(d, "data/dst/")
    elif direction == "pull":
        src, dst = mods["data"] / "src", tmp_path / "dst"
        a, b = ep(d, "data/src/"), f"{dst}/"
    else:
        src, dst = mods["other"] / "src", mods["data"] / "dst"
        a, b = ep(d, "other/src/"), ep(d, "data/dst/")
    make_full_tree(src)
    stale_copy(src, dst)
    oracle = tmp_path / "oracle"
    stale_copy(src, oracle)

    want = actions_of(blit(d, "mirror", "-n", "--json", f"{src}/", f"{oracle}/"))
    kinds = {k for k, _ in want}
    assert kinds == {"copy", "mkdir", "symlink", "link", "special", "delete"}, want
    assert ("delete", "olddir") in want and ("delete", "mode600") in want and ("copy", "mode600") in want

    # The dry run lists what the local engine lists, as JSON events and as text lines.
    assert actions_of(blit(d, "mirror", "-n", "--json", a, b)) == want
    assert lines_of(blit(d, "mirror", "-n", "-v", a, b)) == lines_of(blit(d, "mirror", "-n", "-v", f"{src}/", f"{oracle}/"))
    assert not (dst / "a" / "b" / "c" / "deep.txt").exists() and (dst / "olddir").exists()  # nothing changed

    # The real run changes exactly those entries and says so; then there is nothing left to do.
    assert actions_of(blit(d, "mirror", "-v", "--json", a, b)) == want
    assert_same_tree(src, dst)
    assert actions_of(blit(d, "mirror", "-v", "--json", a, b)) == []
    assert lines_of(blit(d, "mirror", "-v", a, b)) == []


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_copy_into_a_missing_directory_names_it_as_locally(daemon_p: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """`copy SRC DST` with DST missing lands SRC as DST; the lines name SRC's entries as a local
    run does (relative to SRC's parent), dry run and real."""
    d = daemon_p
    src_parent = tmp_path / "local" if direction == "push" else d.modules["data"] / "in"
    src = src_parent / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("f")
    os.symlink("sub/f", src / "l")
    local = blit(d, "copy", "-n", "-v", str(src), str(tmp_path / "oracle"))
    want = lines_of(local)
    assert want == ["copy tree/sub/f", "mkdir tree", "mkdir tree/sub", "symlink tree/l"]
    a, b = (str(src), ep(d, "data/out")) if direction == "push" else (ep(d, "data/in/tree"), str(tmp_path / "out"))
    landed = d.modules["data"] / "out" if direction == "push" else tmp_path / "out"
    assert lines_of(blit(d, "copy", "-n", "-v", a, b)) == want
    assert not landed.exists()
    assert lines_of(blit(d, "copy", "-v", a, b)) == want
    assert (landed / "sub" / "f").read_text() == "f" and os.readlink(landed / "l") == "sub/f"


def test_a_push_of_many_entries_lists_every_one_across_pages(daemon_p: DaemonProcess, tmp_path: Path) -> None:
    """More actions than one page (20,000): every one arrives, once, dry run and real."""
    d = daemon_p
    src = tmp_path / "many"
    src.mkdir()
    n = 25_000
    for i in range(n):
        (src / f"f{i:05d}").write_bytes(b"")
    want = sorted(f"copy f{i:05d}" for i in range(n))
    assert lines_of(blit(d, "copy", "-n", "-v", f"{src}/", ep(d, "data/many/"))) == want
    assert not (d.modules["data"] / "many").exists()
    assert lines_of(blit(d, "copy", "-v", f"{src}/", ep(d, "data/many/"))) == want
    assert len(os.listdir(d.modules["data"] / "many")) == n


# --- what travels: in-process daemon, the wire watched --------------------------------------------


class Recorder:
    """A Progress that keeps the actions it is given."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, str]] = []

    def start(self, summary: Any) -> None:
        pass

    def update(self, files: int, nbytes: int, elapsed: float) -> None:
        pass

    def action(self, action: str, path: str) -> None:
        self.actions.append((action, path))

    def error(self, failure: Any) -> None:
        pass

    def finish(self, summary: Any) -> None:
        pass


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every message encoded in this process (requests and the in-process daemon's replies)."""
    from blit.transport import protocol

    out: list[Any] = []
    real = protocol.encode

    def encode(msg: Any) -> bytes:
        out.append(msg)
        return real(msg)

    monkeypatch.setattr(protocol, "encode", encode)
    return out


def _small_tree(root: Path) -> None:
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("f")
    (root / "g").write_text("g")


@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
async def test_only_a_verbose_or_dry_push_asks_for_actions(daemon: Daemon, tmp_path: Path, sent: list[Any], verbose: bool) -> None:
    from blit import api
    from blit.transport import protocol

    _small_tree(tmp_path / "src")
    rec = Recorder()
    opts = api.Options(record_actions=verbose, tls=daemon.tls)
    from blit.transport import remote

    summary = await remote.remote_transfer(
        "copy", f"{tmp_path / 'src'}/", f"127.0.0.1:{daemon.info.port}:/data/x/", progress=rec,
        tls_enabled=daemon.tls, known_hosts=daemon.known_hosts, record_actions=opts.record_actions,
    )
    assert summary.exit_code == 0 and summary.files_copied == 2
    opens = [m for m in sent if isinstance(m, protocol.OpenTree)]
    asks = [m for m in sent if isinstance(m, protocol.TreeActions)]
    assert len(opens) == 1 and opens[0].report_actions is verbose
    if verbose:
        assert asks and sorted(rec.actions) == [("copy", "d/f"), ("copy", "g"), ("mkdir", "d")]
    else:
        assert not asks and rec.actions == []
    assert (daemon.modules["data"] / "x" / "d" / "f").read_text() == "f"


async def test_a_daemon_without_the_feature_gives_no_lines_and_no_error(
    daemon: Daemon, tmp_path: Path, sent: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that did not announce actions-1 (as an older one) gets no such feature back, so
    it never asks: the run works and lists nothing, as with a daemon that predates it."""
    from blit.transport import protocol, remote

    monkeypatch.setattr(
        protocol.ClientSession, "hello", lambda self: protocol.Hello(protocol=protocol.PROTOCOL_VERSION, software=self.software, features=[protocol.FEATURE_DIR_DIGEST])
    )
    _small_tree(tmp_path / "src")
    rec = Recorder()
    summary = await remote.remote_transfer(
        "mirror", f"{tmp_path / 'src'}/", f"127.0.0.1:{daemon.info.port}:/data/x/", progress=rec, dry_run=True,
        tls_enabled=daemon.tls, known_hosts=daemon.known_hosts, record_actions=True,
    )
    assert summary.exit_code == 0 and summary.files_copied == 2
    replies = [m for m in sent if isinstance(m, protocol.HelloReply)]
    assert replies and protocol.FEATURE_ACTIONS not in replies[0].features
    assert [m.report_actions for m in sent if isinstance(m, protocol.OpenTree)] == [False]
    assert not any(isinstance(m, protocol.TreeActions) for m in sent) and rec.actions == []


def test_action_pages_are_bounded_and_a_full_log_counts_what_it_drops() -> None:
    from blit.transport import protocol
    from blit.transport.tree import ActionLog

    log = ActionLog()
    for i in range(45_000):
        log.add("copy", f"d/f{i}")
    pages = [log.take() for _ in range(4)]
    assert [len(p) for p in pages] == [20_000, 20_000, 5_000, 0] and len(log) == 0
    assert pages[0][0] == protocol.Action(action="copy", path=b"d/f0") and pages[2][-1].path == b"d/f44999"
    long = "x" * 60_000
    for _ in range(100):
        log.add("delete", long)
    page = log.take()
    assert sum(len(a.path) for a in page) < protocol.ACTION_PAGE_BYTES + 60_000 and len(protocol.encode(protocol.ActionPage(actions=page, more=True))) < protocol.MAX_MESSAGE
    small = ActionLog(cap=1000)
    for i in range(100):
        small.add("mkdir", f"dir{i:03d}")
    kept = len(small)
    assert small.dropped == 100 - kept and kept > 0
    assert [a.path for a in small.take()] == [f"dir{i:03d}".encode() for i in range(kept)]


@pytest.mark.parametrize("direction", ["local", "push", "pull"])
@pytest.mark.parametrize("case", [["copy"], ["mirror", "--exclude", "keep"], ["mirror"]], ids=["copy", "mirror-excluded", "mirror"])
def test_a_dry_run_fails_where_the_real_run_fails_to_replace_a_directory(
    daemon_p: DaemonProcess, tmp_path: Path, direction: str, case: list[str]
) -> None:
    """A source file where the destination has a directory holding a file: copy does not replace
    a non-empty directory, mirror does unless the filters protect something in it. The dry run
    prints the same lines, the same failure and exit code as the real run, and changes nothing."""
    d = daemon_p
    local_src, local_dst = tmp_path / "src", tmp_path / "dst"
    src, dst = (d.modules["data"] / "src", local_dst) if direction == "pull" else (local_src, local_dst)
    if direction == "push":
        dst = d.modules["data"] / "dst"
    src.mkdir(parents=True)
    (src / "x").write_text("file in the source")
    (src / "y").write_text("y")
    (dst / "x").mkdir(parents=True)
    (dst / "x" / "keep").write_text("in the way")
    a = ep(d, "data/src/") if direction == "pull" else f"{src}/"
    b = ep(d, "data/dst/") if direction == "push" else f"{dst}/"

    def outcome(r: subprocess.CompletedProcess[str]) -> tuple[int, list[str], list[str]]:
        errs = [ln for ln in r.stderr.splitlines() if ln.startswith("blit:") and "pinned the TLS certificate" not in ln]
        return r.returncode, sorted(r.stdout.splitlines()[:-1]), errs

    dry = outcome(blit(d, *case, "-n", "-v", a, b))
    assert (dst / "x" / "keep").read_text() == "in the way" and not (dst / "y").exists()
    real = outcome(blit(d, *case, "-v", a, b))
    assert dry == real
    if case == ["mirror"]:
        assert real == (0, ["copy x", "copy y", "delete x"], []) and (dst / "x").read_text() == "file in the source"
    else:
        why = "directory not empty (mirror replaces it)" if case == ["copy"] else "directory holds excluded entries, which mirror keeps"
        assert real == (3, ["copy y"], [f"blit: x: replace: {why}"])
        assert (dst / "x" / "keep").read_text() == "in the way"
