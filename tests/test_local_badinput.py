"""Bad input gets one clear line naming the problem, the documented exit code, and nothing
changed; a full disk stops the run with nothing half-written under a real name."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers import (
    MiB,
    NOBODY,
    Symlink,
    assert_same_tree,
    chown_tree,
    describe_output,
    extra_entries,
    make_tree,
    mounted_tmpfs,
    run_blit,
    snapshot,
    stderr_lines,
    write_file,
)

pytestmark = pytest.mark.usefixtures("blit_exe")

TREE = {"a.txt": "a\n", "sub/": {"b.txt": "b\n", "inner/": {}}, "link": Symlink("a.txt")}


def _one_error_line(proc, *needles: str, pattern: str | None = None) -> str:  # type: ignore[no-untyped-def]
    """The single stderr line `blit: error: MESSAGE`, naming each needle (case-insensitive)."""
    lines = stderr_lines(proc)
    assert len(lines) == 1, f"expected one line on stderr\n{describe_output(proc)}"
    line = lines[0]
    assert line.startswith("blit: error: "), line
    for n in needles:
        assert n.lower() in line.lower(), f"{n!r} not in {line!r}"
    if pattern:
        assert re.search(pattern, line, re.I), f"{line!r} does not say {pattern!r}"
    return line


@pytest.mark.parametrize("op", ["copy", "mirror", "move"])
def test_missing_source(tmp_path: Path, op: str) -> None:
    before = snapshot(tmp_path, include_root=False)
    proc = run_blit(op, tmp_path / "no_such_dir", tmp_path / "dst")
    assert proc.returncode == 2, describe_output(proc)
    _one_error_line(proc, "no_such_dir")
    assert proc.stdout == b""
    assert_same_tree(before, snapshot(tmp_path, include_root=False))


def test_a_fatal_line_shows_a_name_s_odd_bytes_escaped_on_one_line(tmp_path: Path) -> None:
    """A newline or a byte that is not UTF-8 in a name a fatal error quotes: one line, the name
    shown as -v and failure lines show it (a newline split the line; \\udce9 for \\#351, QA)."""
    for raw, shown in ((b"no\nsuch", "no\\#012such"), (b"caf\xe9", "caf\\#351")):
        proc = run_blit("copy", os.fsencode(tmp_path) + b"/" + raw, tmp_path / "dst")
        assert proc.returncode == 2, describe_output(proc)
        assert _one_error_line(proc).endswith(f"source does not exist: {tmp_path}/{shown}")


def test_a_source_below_a_directory_we_may_not_search(nobody_tmp: Path) -> None:
    """As a plain user, a source inside a directory of mode 000: one line, exit 2 (it was a
    Python traceback, exit 1, QA)."""
    par = nobody_tmp / "par"
    (par / "noread").mkdir(parents=True)
    (par / "noread" / "y").write_text("y")
    os.chmod(par / "noread", 0)
    try:
        proc = run_blit("copy", par / "noread" / "y", nobody_tmp / "dst", as_nobody=True)
        assert proc.returncode == 2, describe_output(proc)
        assert _one_error_line(proc).endswith(f"cannot read source {par}/noread/y: Permission denied")
    finally:
        os.chmod(par / "noread", 0o755)


@pytest.mark.parametrize(
    ("src", "dst"),
    [("src/", "src/sub/dst"), ("src", "src/dst"), ("src/", "src/sub"), ("src", "src/sub/deeper/x"),
     ("src/", "alias/inside"), ("src", "./src/../src/sub"), ("src/", "into_src"),
     ("src/", "into_src/new")],
)  # fmt: skip
@pytest.mark.parametrize("op", ["copy", "mirror", "move"])
def test_destination_inside_the_source(tmp_path: Path, op: str, src: str, dst: str) -> None:
    make_tree(tmp_path / "src", TREE)
    os.symlink("src", tmp_path / "alias")
    os.symlink("src/sub", tmp_path / "into_src")
    _assert_refused_untouched(tmp_path, op, src, dst, pattern="inside|within")


def _assert_refused_untouched(tmp_path: Path, op: str, src: str, dst: str, *flags: str, pattern: str) -> None:
    """`blit op [flags] src dst` (in tmp_path) exits 2 with one error line matching `pattern`,
    and changes nothing under tmp_path."""
    before = snapshot(tmp_path, include_root=False)
    proc = run_blit(op, *flags, src, dst, cwd=tmp_path)
    assert proc.returncode == 2, describe_output(proc)
    _one_error_line(proc, pattern=pattern)
    assert_same_tree(before, snapshot(tmp_path, include_root=False))


@pytest.mark.parametrize(
    ("src", "dst"),
    [("src/", "src"), ("src/", "src/"), ("src/", "alias/"), ("src/", "alias"),
     ("src/", "src/../src"), ("src/", "./src/sub/.."), ("src/a.txt", "src/a.txt"),
     ("src/a.txt", "alias/a.txt"), ("src/a.txt", "src/sub/../a.txt"), ("src/a.txt", "src/")],
)  # fmt: skip
@pytest.mark.parametrize("op", ["copy", "mirror", "move"])
def test_source_equal_to_destination(tmp_path: Path, op: str, src: str, dst: str) -> None:
    make_tree(tmp_path / "src", TREE)
    os.symlink("src", tmp_path / "alias")
    _assert_refused_untouched(tmp_path, op, src, dst, pattern="same|equal|itself")


@pytest.mark.parametrize("flags", [["--no-tls"], ["--force-h2-data"], ["--secrets-file", "secrets"]], ids=lambda f: f[0])
@pytest.mark.parametrize("op", ["copy", "mirror", "move"])
def test_a_daemon_only_flag_on_a_local_run_is_refused(tmp_path: Path, op: str, flags: list[str]) -> None:
    """A flag that only a transfer through a daemon uses is refused on a local one (where it
    would change nothing: likely a remote endpoint mistyped), before anything is done."""
    make_tree(tmp_path / "src", TREE)
    write_file(tmp_path / "secrets", b"s3cret\n")
    _assert_refused_untouched(
        tmp_path, op, "src/", "dst/", *flags, pattern=f"^blit: error: {flags[0]} is for a transfer through a daemon .*both local$"
    )


@pytest.mark.parametrize("op", ["copy", "mirror", "move"])
def test_a_file_onto_a_file_named_with_a_trailing_slash(tmp_path: Path, op: str) -> None:
    """cp and rsync refuse `file DST/` when DST is a file ("Not a directory"); it is not replaced."""
    make_tree(tmp_path / "src", TREE)
    write_file(tmp_path / "dst", b"old")
    _assert_refused_untouched(tmp_path, op, "src/a.txt", "dst/", pattern="^blit: error: destination is not a directory: dst/$")


@pytest.mark.parametrize(
    "endpoint",
    [":/module/path", "host:", "host:relative/path", "host:99999:/module/path",
     "host:-1:/m/p", "[::1:/module/path", "[]:873:/m/p"],
)  # fmt: skip
@pytest.mark.parametrize("side", ["source", "destination"])
def test_malformed_endpoint(tmp_path: Path, endpoint: str, side: str) -> None:
    make_tree(tmp_path / "src", TREE)
    before = snapshot(tmp_path, include_root=False)
    args = ("src/", endpoint) if side == "destination" else (endpoint, "dst")
    proc = run_blit("copy", *args, cwd=tmp_path)
    assert proc.returncode == 2, describe_output(proc)
    _one_error_line(proc, endpoint)
    assert_same_tree(before, snapshot(tmp_path, include_root=False))


def test_a_local_name_with_a_colon_is_reachable_as_dot_slash(tmp_path: Path) -> None:
    make_tree(tmp_path / "src:x", TREE)
    run_blit("copy", "./src:x/", "./dst:y", cwd=tmp_path, check=0)
    assert_same_tree(tmp_path / "src:x", tmp_path / "dst:y")


@pytest.mark.parametrize(
    "args",
    [["copy", "--frobnicate", "src/", "dst"], ["copy", "src/"], ["copy"],
     ["copy", "src/", "dst", "extra"], ["teleport", "src/", "dst"],
     ["copy", "--checksum", "--size-only", "src/", "dst"], ["copy", "-q", "-v", "src/", "dst"],
     ["daemon", "--port", "99999", "--no-mdns"]],
    ids=["unknown option", "missing DST", "missing SRC and DST", "extra argument",
         "unknown verb", "conflicting compare flags", "quiet and verbose", "daemon port out of range"],
)  # fmt: skip
def test_bad_usage(tmp_path: Path, args: list[str]) -> None:
    make_tree(tmp_path / "src", TREE)
    before = snapshot(tmp_path, include_root=False)
    proc = run_blit(*args, cwd=tmp_path)
    assert proc.returncode == 2, describe_output(proc)
    lines = stderr_lines(proc)
    assert len(lines) == 1, f"expected one line naming the problem\n{describe_output(proc)}"
    if "--frobnicate" in args:
        assert "--frobnicate" in lines[0]
    if "teleport" in args:
        assert "teleport" in lines[0]
    assert_same_tree(before, snapshot(tmp_path, include_root=False))


def test_json_bad_usage_still_ends_with_a_summary(tmp_path: Path) -> None:
    import json

    make_tree(tmp_path / "src", TREE)
    proc = run_blit("copy", "--json", "--checksum", "--size-only", "src/", "dst", cwd=tmp_path)
    assert proc.returncode == 2
    last = json.loads(proc.stdout.decode().splitlines()[-1])
    assert last["event"] == "summary" and last["exit_code"] == 2 and "--size-only" in last["fatal"]
    for args in (["--bogus", "src/", "dst"], ["src/"]):  # what the command-line parser refuses too
        proc = run_blit("copy", "--json", *args, cwd=tmp_path)
        assert proc.returncode == 2, describe_output(proc)
        (line,) = proc.stdout.decode().splitlines()
        last = json.loads(line)
        assert last["event"] == "summary" and last["exit_code"] == 2, last


def test_quiet_prints_nothing_on_success_even_in_a_dry_run(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", TREE)
    proc = run_blit("copy", "-q", "-n", "src/", "dst", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b"", describe_output(proc)
    assert not (tmp_path / "dst").exists()


@pytest.mark.root
@pytest.mark.parametrize("what", ["dir", "dir contents", "file"])
def test_unreadable_source_root_is_fatal(nobody_tmp: Path, what: str) -> None:
    make_tree(nobody_tmp / "src", TREE)
    chown_tree(nobody_tmp / "src", NOBODY, NOBODY)
    if what == "file":
        os.chmod(nobody_tmp / "src/a.txt", 0o000)
        src = str(nobody_tmp / "src/a.txt")
    else:
        os.chmod(nobody_tmp / "src", 0o000)
        src = f"{nobody_tmp}/src" + ("/" if what == "dir contents" else "")
    before = snapshot(nobody_tmp, include_root=False)
    proc = run_blit("copy", src, nobody_tmp / "dst", as_nobody=True)
    assert proc.returncode == 1, describe_output(proc)
    _one_error_line(proc, "Permission denied")
    assert_same_tree(before, snapshot(nobody_tmp, include_root=False))


FAR = (2300 - 1970) * 365 * 86400 * 10**9  # beyond int64 nanoseconds (2262)


@pytest.mark.parametrize("fast", [True, False], ids=["plain tree", "with a filter"])
def test_a_time_beyond_2262_is_reported_and_never_wrapped(tmp_path: Path, fast: bool) -> None:
    """blit keeps times as int64 nanoseconds: a source entry outside 1677-2262 is one failure
    line and exit 3 (the rest lands), never a crash or a wrapped date; a rerun says the same."""
    src = tmp_path / "src"
    write_file(src / "far", b"far")
    write_file(src / "ok", b"ok")
    os.utime(src / "far", ns=(FAR, FAR))
    args = ["copy", f"{src}/", str(tmp_path / "dst")] + ([] if fast else ["--exclude", "nothing"])
    for _ in range(2):
        proc = run_blit(*args)
        assert proc.returncode == 3, describe_output(proc)
        assert stderr_lines(proc) == ["blit: far: stat: its time is outside the years 1677-2262, which blit cannot keep"]
        assert sorted(os.listdir(tmp_path / "dst")) == ["ok"]


@pytest.mark.root
def test_a_full_disk_under_large_files_is_one_line(tmp_path: Path) -> None:
    """Large files are copied in parallel: each one the disk refused printed its own line
    before the fatal one (cli.md: one line)."""
    src = tmp_path / "src"
    for i in range(6):
        write_file(src / f"f{i}", os.urandom(6 * MiB))
    with mounted_tmpfs(tmp_path / "mnt", "14m") as mnt:
        proc = run_blit("copy", f"{src}/", mnt / "dst")
        assert proc.returncode == 1, describe_output(proc)
        lines = stderr_lines(proc)
        assert len(lines) == 1 and lines[0].startswith("blit: error: No space left on device (writing f"), describe_output(proc)


@pytest.mark.root
def test_full_destination_disk(tmp_path: Path) -> None:
    """5 MiB of files onto a 2 MiB tmpfs: exit 1, "No space left", nothing partial left behind."""
    src = tmp_path / "src"
    for i in range(10):
        write_file(src / f"f{i:02d}.bin", os.urandom(512 * 1024))
    write_file(src / "sub/tiny.txt", b"tiny\n")
    write_file(src / "sub/big.bin", os.urandom(MiB + 5))
    src_snap = snapshot(src)
    with mounted_tmpfs(tmp_path / "mnt", "2m") as mnt:
        proc = run_blit("copy", f"{src}/", mnt / "dst")
        assert proc.returncode == 1, describe_output(proc)
        err = proc.stderr.decode(errors="replace")
        assert "No space left" in err, describe_output(proc)
        lines = stderr_lines(proc)
        assert len(lines) == 1 and lines[0].startswith("blit: error: No space left on device (writing "), describe_output(proc)
        dst_snap = snapshot(mnt / "dst", include_root=False) if (mnt / "dst").exists() else {}
        for p, e in dst_snap.items():
            if e.kind == "file":
                assert p in src_snap, f"{p!r} is not a source file: a temporary file left behind"
                assert e.sha256 == src_snap[p].sha256, f"{p!r} is partial under its real name"
        assert not extra_entries(src_snap, dst_snap), extra_entries(src_snap, dst_snap)


@pytest.mark.parametrize(("what", "dst"), [("file", "dl/"), ("dir contents", "dl/"), ("dir", "dl/")])
def test_a_destination_that_is_a_symlink_to_nothing_is_named_so(tmp_path: Path, what: str, dst: str) -> None:
    """`blit copy f dl/` with dl a dangling symlink said the path "goes through a file"; it is a
    symlink to nothing (cp: "Not a directory"). Refused, one line, nothing made."""
    make_tree(tmp_path, {"f": "x\n", "d/": {"g": "g\n"}, "dl": Symlink("nowhere")})
    before = snapshot(tmp_path, include_root=False)
    src = {"file": "f", "dir contents": "d/", "dir": "d"}[what]
    proc = run_blit("copy", src, dst, cwd=tmp_path)
    assert proc.returncode == 2, describe_output(proc)
    _one_error_line(proc, "dl", pattern=r"a symbolic link to nothing, not a directory")
    assert_same_tree(before, snapshot(tmp_path, include_root=False))
