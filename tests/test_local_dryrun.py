"""--dry-run changes nothing and lists what would be done; --json is valid NDJSON ending in the
documented summary; the default output is one summary line, -q prints nothing, -v one line per
entry (docs/cli.md, "Output" and "JSON events")."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from helpers import (
    NOBODY,
    Symlink,
    assert_same_tree,
    chown_tree,
    describe_output,
    json_events,
    make_tree,
    run_blit,
    snapshot,
    write_file,
)

pytestmark = pytest.mark.usefixtures("blit_exe")

TREE = {
    "a.txt": "a\n",
    "b.bin": b"\x01" * 5000,
    "sub/": {"c.txt": "c\n", "deeper/": {"d.txt": "d\n"}},
    "empty/": {},
    "link": Symlink("a.txt"),
    b"caf\xe9": "latin-1 name\n",
    "space name.txt": "s\n",
}
N_FILES = 6
N_BYTES = 2 + 5000 + 2 + 2 + len("latin-1 name\n") + 2

SUMMARY_KEYS = {"event", "operation", "files_copied", "bytes_copied", "files_deleted",
                "files_skipped", "dirs_created", "links_created", "failures", "duration_s",
                "dry_run", "exit_code"}  # fmt: skip


def _stale_dst(tmp_path: Path, src: Path) -> Path:
    dst = tmp_path / "dst"
    run_blit("copy", f"{src}/", dst, check=0)
    write_file(dst / "extra.txt", b"extra\n")
    write_file(dst / "extra_dir/x.txt", b"x\n")
    write_file(dst / "a.txt", b"stale and longer\n")
    return dst


@pytest.mark.parametrize("op", ["copy", "mirror", "move"])
def test_dry_run_changes_nothing(tmp_path: Path, op: str) -> None:
    src = make_tree(tmp_path / "src", TREE)
    dst = _stale_dst(tmp_path, src)
    src_before, dst_before = snapshot(src), snapshot(dst)
    proc = run_blit(op, "--dry-run", f"{src}/", dst, check=0)
    assert_same_tree(src_before, snapshot(src))
    assert_same_tree(dst_before, snapshot(dst))
    out = proc.stdout.decode(errors="surrogateescape")
    assert "a.txt" in out, describe_output(proc)  # the stale file would be copied
    if op == "mirror":
        assert "extra.txt" in out and "extra_dir" in out, describe_output(proc)
    assert "extra.txt" not in out or op == "mirror", describe_output(proc)


def test_dry_run_into_a_missing_destination_creates_nothing(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    before = snapshot(src)
    proc = run_blit("copy", "-n", f"{src}/", tmp_path / "new/dst", check=0)
    assert not os.path.lexists(tmp_path / "new")
    assert_same_tree(before, snapshot(src))
    out = proc.stdout
    for name in (b"a.txt", b"b.bin", b"sub/c.txt", b"sub/deeper/d.txt", b"space name.txt", b"link"):
        assert name in out, f"{name!r} not listed\n{describe_output(proc)}"


def test_dry_run_json_lists_each_action_with_round_tripping_paths(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    dst = _stale_dst(tmp_path, src)
    dst_before = snapshot(dst)
    proc = run_blit("mirror", "--dry-run", "--json", f"{src}/", dst, check=0)
    assert_same_tree(dst_before, snapshot(dst))
    events = json_events(proc)
    assert events[0]["event"] == "start" and events[0]["dry_run"] is True
    actions = {(e["action"], os.fsencode(e["path"])) for e in events if e["event"] == "action"}
    assert ("copy", b"a.txt") in actions, actions
    deleted = {p for a, p in actions if a == "delete"}
    assert b"extra.txt" in deleted and any(p.startswith(b"extra_dir") for p in deleted), actions
    assert not any(p.startswith(b"sub") for p in deleted)
    summary = events[-1]
    assert summary["event"] == "summary" and summary["dry_run"] is True
    assert summary["exit_code"] == 0

    # A non-UTF-8 name comes out with surrogate escapes and round-trips through os.fsencode.
    proc = run_blit("copy", "--dry-run", "--json", f"{src}/", tmp_path / "fresh", check=0)
    paths = {os.fsencode(e["path"]) for e in json_events(proc) if e["event"] == "action"}
    assert b"caf\xe9" in paths, paths


def test_json_run_is_ndjson_ending_in_the_documented_summary(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    proc = run_blit("copy", "--json", f"{src}/", tmp_path / "dst", check=0)
    assert proc.stderr == b"", describe_output(proc)
    events = json_events(proc)
    start = events[0]
    assert start["event"] == "start"
    assert start["operation"] == "copy" and start["dry_run"] is False
    assert {"source", "destination"} <= start.keys()
    summary = events[-1]
    assert summary["event"] == "summary"
    assert SUMMARY_KEYS <= summary.keys(), SUMMARY_KEYS - summary.keys()
    assert summary["operation"] == "copy"
    assert summary["files_copied"] == N_FILES
    assert summary["bytes_copied"] == N_BYTES
    assert summary["files_deleted"] == 0
    assert summary["failures"] == []
    assert summary["dry_run"] is False
    assert summary["exit_code"] == 0 == proc.returncode
    assert isinstance(summary["duration_s"], (int, float)) and summary["duration_s"] >= 0
    assert [e["event"] for e in events].count("summary") == 1
    for e in events:
        if e["event"] == "progress":
            assert {"files_done", "bytes_done", "files_total", "bytes_total", "elapsed_s"} <= e.keys()
    assert_same_tree(src, tmp_path / "dst")


@pytest.mark.slow
def test_json_progress_events_come_at_most_ten_per_second(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(40):
        write_file(src / f"d{i % 8}" / f"f{i}.bin", os.urandom(4 * 1024 * 1024))
    for i in range(3000):
        write_file(src / f"small{i % 30}" / f"s{i}", b"x" * (i % 500))
    t0 = time.monotonic()
    proc = run_blit("copy", "--json", f"{src}/", tmp_path / "dst", check=0)
    wall = time.monotonic() - t0
    events = json_events(proc)
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) <= 10 * wall + 1, (len(progress), wall)
    elapsed = [e["elapsed_s"] for e in progress]
    assert elapsed == sorted(elapsed)
    assert all(b - a >= 0.09 for a, b in zip(elapsed, elapsed[1:])), elapsed
    done = [e["bytes_done"] for e in progress]
    assert done == sorted(done)


def test_progress_knows_the_totals_once_every_directory_is_planned(tmp_path: Path) -> None:
    """For an ETA (SPEC: files, bytes, rate and ETA): a local run's progress events carry the
    run's totals once nothing is left to plan, and they are what the summary then counts (a
    hard-link group's data once)."""
    src = tmp_path / "src"
    src.mkdir()
    chunk = os.urandom(1 << 20)
    with open(src / "big.bin", "wb") as f:  # long enough to be seen copying (~0.5 s)
        for _ in range(1024):
            f.write(chunk)
    for i in range(20):
        write_file(src / f"d{i % 4}" / f"f{i}", b"x" * i)
    os.link(src / "d0" / "f4", src / "d1" / "linked")
    for flags in ([], ["-I"]):  # -I: the group at the destination is copied again too
        proc = run_blit("copy", "--json", *flags, f"{src}/", tmp_path / "dst", check=0)
        events = json_events(proc)
        summary = events[-1]
        known = [e for e in events if e["event"] == "progress" and e["bytes_total"] is not None]
        assert known, events[:5]
        for e in known:
            assert e["bytes_total"] == summary["bytes_copied"], (flags, e, summary)
            assert e["files_total"] == summary["files_copied"] + summary["files_skipped"] + summary["links_created"], (e, summary)


@pytest.mark.root
def test_json_reports_each_failure_and_exit_code_3(nobody_tmp: Path) -> None:
    src = make_tree(nobody_tmp / "src", {"ok.txt": "ok\n", "secret.txt": "s\n"})
    chown_tree(src, NOBODY, NOBODY)
    os.chmod(src / "secret.txt", 0o000)
    proc = run_blit("copy", "--json", f"{src}/", nobody_tmp / "dst", as_nobody=True)
    assert proc.returncode == 3, describe_output(proc)
    events = json_events(proc)
    errors = [e for e in events if e["event"] == "error"]
    assert [e["path"] for e in errors] == ["secret.txt"], errors
    assert errors[0]["op"] and "Permission denied" in errors[0]["message"]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["exit_code"] == 3
    assert [f["path"] for f in summary["failures"]] == ["secret.txt"]
    assert {"path", "op", "message"} <= summary["failures"][0].keys()
    assert (nobody_tmp / "dst/ok.txt").read_bytes() == b"ok\n"


def test_default_output_is_one_summary_line(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    proc = run_blit("copy", f"{src}/", tmp_path / "dst", check=0)
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1, describe_output(proc)
    assert lines[0].startswith(f"copied {N_FILES} files"), lines
    assert proc.stderr == b""


def test_a_name_with_a_control_character_is_shown_on_one_line(tmp_path: Path) -> None:
    """As rsync prints it: a newline in a name is \\#012, so each entry stays one line; a name
    that holds those very characters has its backslash escaped (rsync: \\#134), so it never
    reads as the name with a newline."""
    src = tmp_path / "src"
    write_file(src / "a\nb", b"x")
    write_file(src / "tab\there", b"y")
    write_file(src / "a\\#012b", b"z")
    write_file(Path(os.fsdecode(bytes(src) + b"/caf\xe9")), b"latin-1")  # not UTF-8: no raw byte on a terminal
    proc = run_blit("copy", "-v", f"{src}/", tmp_path / "dst", check=0)
    lines = proc.stdout.decode().splitlines()  # all text: decoding would fail on a raw byte
    assert sorted(lines[:-1]) == ["copy a\\#012b", "copy a\\#134#012b", "copy caf\\#351", "copy tab\\#011here"], describe_output(proc)
    assert (tmp_path / "dst" / "a\nb").read_bytes() == b"x"


def test_a_mirror_dry_run_counts_the_deletions_the_real_run_makes(tmp_path: Path) -> None:
    """Every entry below an extra directory counts, in the dry run as in the real run (rsync's
    "Number of deleted files"); an excluded one, and so its directory, stays in both."""
    src = tmp_path / "src"
    src.mkdir()
    dst = tmp_path / "dst"
    for rel in ("x/y/z", "x/keep.tmp", "e"):
        write_file(dst / rel, b"extra")
    counts = []
    for dry in (["--dry-run"], []):
        proc = run_blit("mirror", "--json", *dry, "--exclude", "*.tmp", f"{src}/", dst, check=0)
        counts.append(json.loads(proc.stdout.decode().splitlines()[-1])["files_deleted"])
    assert counts == [3, 3]  # x/y/z, x/y and e
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == ["x", "x/keep.tmp"]


def test_entries_a_mirror_removes_to_make_way_are_counted_in_the_dry_run_too(tmp_path: Path) -> None:
    """A directory replaced by a file goes with what is in it (counted); one holding excluded
    entries keeps them and fails, but what it held besides went (counted too)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_file(src / "e", b"e")
    write_file(src / "d", b"d")
    for rel in ("e/x", "e/y", "d/keep.log", "d/other"):
        write_file(dst / rel, b"old")
    counts = []
    for dry in (["--dry-run"], []):
        proc = run_blit("mirror", "--json", *dry, "--exclude", "*.log", f"{src}/", dst, check=3)
        counts.append(json.loads(proc.stdout.decode().splitlines()[-1])["files_deleted"])
    assert counts == [4, 4]  # e/x, e/y, e; d/other
    assert (dst / "e").read_bytes() == b"e" and sorted(os.listdir(dst / "d")) == ["keep.log"]


def test_quiet_prints_nothing_on_success(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    for flag in ("-q", "--quiet"):
        proc = run_blit("copy", flag, f"{src}/", tmp_path / f"dst{flag}", check=0)
        assert proc.stdout == b"" and proc.stderr == b"", describe_output(proc)
        assert_same_tree(src, tmp_path / f"dst{flag}")


def test_verbose_prints_one_line_per_entry_changed(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    proc = run_blit("copy", "-v", f"{src}/", tmp_path / "dst", check=0)
    out = proc.stdout.splitlines()
    for name in (b"a.txt", b"b.bin", b"sub/c.txt", b"sub/deeper/d.txt", b"link"):
        assert sum(1 for ln in out if ln.endswith(b" " + name)) == 1, (name, out)
    assert any(b"caf" in ln for ln in out), out  # the non-UTF-8 name, raw or escaped
    again = run_blit("copy", "-v", f"{src}/", tmp_path / "dst", check=0)
    assert len(again.stdout.splitlines()) == 1, describe_output(again)  # only the summary


def test_verbose_mirror_lists_deletions(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    dst = _stale_dst(tmp_path, src)
    proc = run_blit("mirror", "-v", f"{src}/", dst, check=0)
    out = proc.stdout.splitlines()
    assert any(b"extra.txt" in ln for ln in out), describe_output(proc)
    assert any(b"extra_dir" in ln for ln in out), describe_output(proc)
    assert any(ln.endswith(b" a.txt") for ln in out), describe_output(proc)
    assert_same_tree(src, dst)


def test_progress_bar_goes_to_a_terminal_on_stderr_and_changes_nothing_else(tmp_path: Path) -> None:
    """On a terminal the bar is drawn on stderr; when stderr is a file or a pipe nothing is
    written there (rich left a lone newline), and stdout holds the summary either way."""
    src = make_tree(tmp_path / "src", TREE)
    proc = run_blit("copy", "--progress", f"{src}/", tmp_path / "dst", check=0)
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"copied {N_FILES} files"), describe_output(proc)
    assert proc.stderr == b"", describe_output(proc)
    assert_same_tree(src, tmp_path / "dst")

    code, out, drawn = _on_a_terminal("copy", "--progress", f"{src}/", tmp_path / "dst2")
    assert code == 0 and out.decode().startswith(f"copied {N_FILES} files"), (code, out)
    assert b"files" in drawn, drawn
    assert_same_tree(src, tmp_path / "dst2")


def _on_a_terminal(*args: object) -> tuple[int, bytes, bytes]:
    """Run blit with stderr on a pseudo-terminal (stdout a pipe): exit code, stdout, and what
    the terminal received."""
    import pty
    import subprocess

    from helpers import BLIT, BLIT_ENV

    main, tty = pty.openpty()
    try:
        p = subprocess.run([BLIT, *map(str, args)], stdout=subprocess.PIPE, stderr=tty, stdin=subprocess.DEVNULL, env=BLIT_ENV, timeout=60)
        os.close(tty)
        tty = -1
        drawn = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(main)
        if tty >= 0:
            os.close(tty)
    return p.returncode, p.stdout, drawn


def test_the_bar_is_taken_down_however_the_run_ends_and_lines_stay_whole(tmp_path: Path) -> None:
    """--progress on a terminal: a run ending with a fatal error left the bar drawn under its
    error line and the cursor hidden (a real newline also cut long lines at rich's width);
    -v lines went to the terminal instead of stdout."""
    src = make_tree(tmp_path / "src", TREE)
    code, out, drawn = _on_a_terminal("copy", "--progress", f"{src}/", "127.0.0.1:1:/m/x")
    assert code == 1, drawn
    assert b"\x1b[?25h" in drawn[drawn.rindex(b"\x1b[?25l") :], drawn  # the cursor is shown again
    tail = drawn[drawn.rindex(b"\x1b[?25h") :]
    assert b"blit: error: cannot reach the daemon at 127.0.0.1:1: " in tail and b"files" not in tail.split(b"blit: error:")[1], drawn

    far = src / ("a" * 60)  # a failure line longer than 80 columns
    far.write_text("x")
    os.utime(far, ns=(10**19, 10**19))  # year 2286: outside what blit keeps
    code, out, drawn = _on_a_terminal("copy", "-v", "--progress", f"{src}/", tmp_path / "dst")
    assert code == 3, drawn
    line = next(ln for ln in drawn.split(b"\r\n") if b"a" * 60 in ln)
    assert line.endswith(b"which blit cannot keep"), drawn
    assert out.splitlines()[-1].startswith(b"copied"), out
    assert sum(ln.startswith(b"copy ") for ln in out.splitlines()) == N_FILES, out  # -v on stdout
    assert b"copy " not in drawn, drawn


def test_hard_link_members_are_named_alike_by_the_dry_run_and_the_real_run(tmp_path: Path) -> None:
    """d/a and d/b are one file; at the destination d/a is up to date and d/b is not. Which
    member was copied and which linked depended on task order: 2 runs in 8 named 'copy d/b,
    link d/a' where the others (and the dry run) named 'link d/b'. The up-to-date member leads."""
    import shutil

    src = tmp_path / "h"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_text("data\n")
    os.link(src / "d" / "a", src / "d" / "b")
    os.utime(src / "d" / "a", ns=(1_577_836_800_000_000_000, 1_577_836_800_000_000_000))
    seen = set()
    for trial in range(6):
        dst = tmp_path / f"t{trial}"
        shutil.copytree(src, dst, symlinks=True)
        (dst / "d" / "b").unlink()
        (dst / "d" / "b").write_text("old\n")
        dry = run_blit("copy", "-n", f"{src}/", dst, check=0).stdout.decode().splitlines()
        real = run_blit("copy", "-v", f"{src}/", dst, check=0).stdout.decode().splitlines()
        assert dry[:-1] == real[:-1], (dry, real)
        seen.add(tuple(real[:-1]))
        assert os.stat(dst / "d" / "a").st_ino == os.stat(dst / "d" / "b").st_ino
        assert (dst / "d" / "b").read_text() == "data\n"
    assert seen == {("link d/b",)}, seen
