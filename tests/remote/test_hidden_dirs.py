"""New directories at a tree transfer's destination stay under a temporary name until their files
have landed, and their small files are created under their own names inside (DestTree, decisions
R41): nobody sees a directory before its files are whole, a large file does not keep its
neighbours hidden, the end of a run (finished or cut short) moves every such directory into place,
a name taken meanwhile is never replaced, and a run that died leaves nothing the next run keeps.

Driven in-process (SourceTree + DestTree, no daemon), and through a real daemon killed mid-push."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from blit import fsops
from blit.transport import protocol
from blit.transport.tree import HIDE_FILE_MAX, DestTree, SourceTree, TreeSpec

from .conftest import blit_cmd, run_daemon_process
from .treeutil import temporaries_after_settling



def _open(p: Path) -> int:
    return os.open(p, os.O_RDONLY | os.O_DIRECTORY)


def _tmp_names(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"{fsops.TMP_PREFIX}*"))


class _Run:
    """One copy of src/ into dst/, a directory at a time, files landed when the test says."""

    def __init__(self, src: Path, dst: Path, spec: TreeSpec | None = None) -> None:
        self.src, self.dst = src, dst
        self.source = SourceTree(_open(src))
        self.dest = DestTree(_open(dst), spec or TreeSpec())
        self.need: dict[str, dict[bytes, int]] = {}  # directory -> name -> file id

    def start(self) -> None:
        """Plan the top (which makes p, the run's first new directory, in place: its files
        are seen as they land) and land its file; the test's tree is below p/."""
        self.plan("", False)
        self.land("", "first")
        self.plan("p", True)

    def plan_new(self, *rels: str) -> None:
        """Plan each of `rels`, new directories, in order."""
        for rel in rels:
            self.plan(rel, True)

    def plan(self, rel: str, new: bool) -> None:
        manifest = self.source.scan(rel)
        planned = self.dest.plan(rel, rel, new, None, manifest.entries, False)
        ids, names = protocol.unpack_needs(planned.packed_need) if planned.packed_need else ([], [])
        self.need[rel] = dict(zip(names, ids))

    def land(self, rel: str, *names: str) -> None:
        buf = bytearray()
        batch = []
        for name in names:
            content = (self.src / rel / name).read_bytes()
            batch.append((self.need[rel][name.encode()], len(buf), len(content)))
            buf += content
        assert self.dest.land_many(batch, buf) == []

    def close(self) -> None:
        self.source.close()
        self.dest.close()


def _tree(src: Path, files: dict[str, bytes]) -> None:
    """`files` below src/p, and src/first."""
    files = {"first": b"1", **{f"p/{rel}": content for rel, content in files.items()}}
    for rel, content in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(content)
    os.chmod(src / "p" / "d", 0o751)
    os.utime(src / "p" / "d", ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))


def _setup(tmp_path: Path, files: dict[str, bytes]) -> _Run:
    """src/ with `files` below p/ (_tree), an empty dst/, and the run between them."""
    (tmp_path / "dst").mkdir()
    _tree(tmp_path / "src", files)
    return _Run(tmp_path / "src", tmp_path / "dst")


def test_a_new_directory_is_seen_only_once_its_files_have_landed(tmp_path: Path) -> None:
    run = _setup(tmp_path, {"d/a": b"a" * 100, "d/b": b"b" * 5000, "d/c": b""})
    src, dst = run.src, run.dst
    p = dst / "p"
    try:
        run.start()
        assert not (p / "d").exists()
        [hidden] = _tmp_names(p)
        assert (p / hidden).is_dir()
        run.plan("p/d", True)
        run.land("p/d", "a", "b")
        assert not (p / "d").exists(), "seen before all its files landed"
        assert sorted(os.listdir(p / hidden)) == ["a", "b"]  # under their own names inside
        run.land("p/d", "c")
        assert sorted(os.listdir(p / "d")) == ["a", "b", "c"]
        assert _tmp_names(dst) == []
        run.dest.finish(True)
        assert run.dest.failures == []
    finally:
        run.close()
    for name in ("a", "b", "c"):
        assert (p / "d" / name).read_bytes() == (src / "p" / "d" / name).read_bytes()
        assert (p / "d" / name).stat().st_mtime_ns == (src / "p" / "d" / name).stat().st_mtime_ns
    d = (p / "d").stat()
    assert stat.S_IMODE(d.st_mode) == 0o751
    assert d.st_mtime_ns == 1_600_000_000_123_456_789


def test_the_runs_first_new_directory_is_made_in_place(tmp_path: Path) -> None:
    """Its files are the first to come: each is seen as it lands (time to first byte)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    dst.mkdir()
    _tree(src, {"d/a": b"a"})
    (src / "q").mkdir()
    (src / "q" / "b").write_bytes(b"b")
    run = _Run(src, dst)
    try:
        run.plan("", False)
        assert (dst / "p").is_dir()
        assert not (dst / "q").exists() and len(_tmp_names(dst)) == 1
        run.plan("p", True)  # p/d: hidden
        run.plan("q", True)
        run.land("q", "b")
        assert (dst / "q" / "b").read_bytes() == b"b"
        assert len(_tmp_names(dst)) == 1
    finally:
        run.close()


def test_subdirectories_land_inside_a_hidden_parent_and_appear_with_it(tmp_path: Path) -> None:
    run = _setup(tmp_path, {"d/a": b"a", "d/e/x": b"x", "d/e/y": b"y"})
    dst = run.dst
    p = dst / "p"
    try:
        run.start()
        run.plan_new("p/d", "p/d/e")
        run.land("p/d/e", "x", "y")  # complete inside the still hidden d
        assert not (p / "d").exists()
        run.land("p/d", "a")
        assert sorted(os.listdir(p / "d")) == ["a", "e"]
        assert sorted(os.listdir(p / "d" / "e")) == ["x", "y"]
        assert _tmp_names(dst) == []
    finally:
        run.close()


def test_a_directory_with_a_large_file_is_in_place_at_once(tmp_path: Path) -> None:
    run = _setup(tmp_path, {"d/big": b"\0" * (HIDE_FILE_MAX + 1), "d/small": b"s"})
    dst = run.dst
    p = dst / "p"
    try:
        run.start()
        assert _tmp_names(dst) != []
        run.plan("p/d", True)
        assert (p / "d").is_dir() and _tmp_names(dst) == []  # nothing landed in it yet, and not hidden
        run.land("p/d", "small")
        assert os.listdir(p / "d") == ["small"]
    finally:
        run.close()


def test_a_run_cut_short_moves_what_it_hid_into_place(tmp_path: Path) -> None:
    """The daemon's session ends (client gone, SIGTERM): close() moves each hidden directory
    into place with the files that landed, all whole; the rerun brings the rest."""
    run = _setup(tmp_path, {"d/a": b"a" * 10, "d/b": b"b" * 10, "d/e/x": b"x"})
    dst = run.dst
    p = dst / "p"
    try:
        run.start()
        run.plan_new("p/d", "p/d/e")
        run.land("p/d", "a")
        assert _tmp_names(dst) != []
    finally:
        run.close()
    assert _tmp_names(dst) == []
    assert os.listdir(p / "d" / "e") == []
    assert sorted(os.listdir(p / "d")) == ["a", "e"]
    assert (p / "d" / "a").read_bytes() == b"a" * 10


def test_a_file_that_took_the_name_meanwhile_is_never_replaced(tmp_path: Path) -> None:
    run = _setup(tmp_path, {"d/a": b"a", "d/b": b"b"})
    dst = run.dst
    p = dst / "p"
    try:
        run.start()
        run.plan("p/d", True)
        run.land("p/d", "a")
        (p / "d").write_bytes(b"not ours to replace")  # someone else's, while the run filled the hidden one
        run.land("p/d", "b")
        run.dest.finish(True)
        # One line for it: the directory's metadata is not tried on the file that has the name.
        assert [(f[0], f[1]) for f in run.dest.failures] == [("p/d", "mkdir")]
        assert "could not be moved into place" in run.dest.failures[0][2]
        # The summary counts what is there (`first`): the two files and their directory went.
        assert (run.dest.files_copied, run.dest.bytes_copied) == (1, 1)
        assert run.dest.dirs_created == sum(1 for q in dst.rglob("*") if q.is_dir())
    finally:
        run.close()
    assert (p / "d").read_bytes() == b"not ours to replace"
    assert _tmp_names(dst) == []


def test_a_directory_made_meanwhile_under_the_name_is_merged_with_ours(tmp_path: Path) -> None:
    """Someone else made the directory while the run filled its hidden one: what they put there
    stays, ours goes in beside it, a file both have is ours (the run's copy of the source, as
    it would have replaced it had the directory been there when planned), a directory both have
    is merged the same way, and the directory gets the source's metadata; no failure."""
    run = _setup(tmp_path, {"d/a": b"a", "d/b": b"b", "d/e/x": b"x"})
    dst, src = run.dst, run.src
    p = dst / "p"
    try:
        run.start()
        run.plan_new("p/d", "p/d/e")
        run.land("p/d/e", "x")  # e complete: in place inside the hidden d
        run.land("p/d", "a")
        (p / "d" / "e").mkdir(parents=True)  # theirs
        (p / "d" / "theirs").write_bytes(b"kept")
        (p / "d" / "b").write_bytes(b"an older b")
        (p / "d" / "e" / "y").write_bytes(b"theirs too")
        os.symlink("/nowhere", p / "d" / "e" / "x")
        run.land("p/d", "b")
        assert run.dest.failures == []
        run.dest.finish(True)
        assert run.dest.failures == []
    finally:
        run.close()
    assert sorted(os.listdir(p / "d")) == ["a", "b", "e", "theirs"]
    assert sorted(os.listdir(p / "d" / "e")) == ["x", "y"]
    assert (p / "d" / "b").read_bytes() == b"b" and (p / "d" / "theirs").read_bytes() == b"kept"
    assert (p / "d" / "e" / "x").read_bytes() == b"x" and (p / "d" / "e" / "y").read_bytes() == b"theirs too"
    d = (p / "d").stat()
    assert (stat.S_IMODE(d.st_mode), d.st_mtime_ns) == (0o751, (src / "p" / "d").stat().st_mtime_ns)
    assert _tmp_names(dst) == []


@pytest.mark.parametrize("rerun_first", [False, True], ids=["cut-short-run-first", "rerun-first"])
def test_a_run_cut_short_that_reveals_while_the_rerun_fills_the_same_directory(tmp_path: Path, rerun_first: bool) -> None:
    """The race a rerun right after an interrupted push met (QA): the daemon was still moving
    the first run's hidden directories into place while the rerun, which had not seen them,
    filled its own under the same names: each of those failed `mkdir: File exists: the new
    directory could not be moved into place`, exit 3. Now the two merge, whichever moves its
    directory into place first: every file lands, whole, with the rerun's content (its source
    changed meanwhile here), no failure, no temporary; and a subdirectory the rerun still
    hides is moved into place inside the merged one later."""
    run1 = _setup(tmp_path, {"d/a": b"a" * 10, "d/b": b"b" * 10, "d/e/x": b"x", "d/e/y": b"y"})
    src, dst = run1.src, run1.dst
    p = dst / "p"
    run2 = None
    try:
        run1.start()
        run1.plan("p/d", True)
        run1.land("p/d", "a")
        run1.plan("p/d/e", True)
        run1.land("p/d/e", "x")
        for name in ("d/a", "d/e/x"):  # changed since the first run read them
            (src / "p" / name).write_bytes(b"new " + name.encode())
        (src / "o").mkdir()  # the rerun's first new directory (made in place): its d is hidden
        run2 = _Run(src, dst)
        run2.plan("", False)
        run2.plan("o", True)
        assert (dst / "o").is_dir()
        run2.plan("p", False)  # the first run's hidden d is not a name the rerun sees
        run2.plan_new("p/d", "p/d/e")
        run2.land("p/d", "a", *(["b"] if rerun_first else []))
        run1.close()  # the first run's end: d and d/e in place, partly filled
        run1 = None
        assert run2.dest.failures == []
        if not rerun_first:
            run2.land("p/d", "b")
        run2.land("p/d/e", "x", "y")  # into its own hidden e, inside the merged d
        run2.dest.finish(True)
        assert run2.dest.failures == []
    finally:
        if run1 is not None:
            run1.close()
        if run2 is not None:
            run2.close()
    assert _tmp_names(dst) == []
    got = sorted(str(q.relative_to(dst)) for q in dst.rglob("*"))
    assert got == sorted(str(q.relative_to(src)) for q in src.rglob("*"))
    for q in src.rglob("*"):
        if q.is_file():
            assert (dst / q.relative_to(src)).read_bytes() == q.read_bytes()


@pytest.mark.parametrize("same_source", [True, False], ids=["same-source", "other-source"])
def test_two_live_runs_into_the_same_place_merge_without_harming_each_other(tmp_path: Path, same_source: bool) -> None:
    """Two pushes into one destination at once (QA): each filled its own hidden `d` and the one
    that came second swapped its own into place, pulling the first run's directory (and the
    hidden subdirectories still filling inside it) from under it: hidden directories were left
    behind, real ones hollow, and runs failed with `No such file or directory`. Now the second
    merges into the first's, which stays where it is: both go on, no failure, no temporary, and
    every file is whole (one run's or the other's)."""
    files = {"d/a": b"a" * 10, "d/b": b"b" * 10, "d/e/x": b"x", "d/e/y": b"y", "d/e/f/z": b"z"}
    runa = _setup(tmp_path, files)
    src_a, dst = runa.src, runa.dst
    src_b = tmp_path / "src_b"
    _tree(src_b, files if same_source else {rel: b"B" + c for rel, c in files.items()})
    runb = _Run(src_b, dst)
    try:
        runa.start()
        runa.plan_new("p/d", "p/d/e")
        runb.plan("", False)
        runb.land("", "first")
        runb.plan("p", False)  # a's p, made in place; its d is hidden: b makes its own
        runb.plan_new("p/d", "p/d/e")
        runb.plan("p/d/e/f", True)
        runa.land("p/d", "a", "b")  # a's d in place, its e still hidden inside
        runb.land("p/d", "a", "b")  # b's d merges into a's
        runa.plan("p/d/e/f", True)  # a goes on inside its d
        runa.land("p/d/e/f", "z")
        runa.land("p/d/e", "x", "y")
        runb.land("p/d/e/f", "z")
        runb.land("p/d/e", "x", "y")
        for run in (runa, runb):
            run.dest.finish(True)
            assert run.dest.failures == []
    finally:
        runa.close()
        runb.close()
    assert _tmp_names(dst) == []
    got = sorted(str(q.relative_to(dst)) for q in dst.rglob("*"))
    assert got == sorted(str(q.relative_to(src_a)) for q in src_a.rglob("*"))
    for q in src_a.rglob("*"):
        if q.is_file():
            rel = q.relative_to(src_a)
            assert (dst / rel).read_bytes() in (q.read_bytes(), (src_b / rel).read_bytes()), rel


def test_a_first_directory_someone_made_meanwhile_is_taken_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's first new directory is made in place (its files are seen as they land). One
    that another writer made between the run's scan and its mkdir failed `mkdir: File exists`
    with every file in it, and every later new directory was tried in place again and failed
    the same way (QA: 200 directories, 0 files, exit 3). Now it is taken as it is (as mkdir -p
    would), what lands replaces the names it holds, its other entries stay, and the run's
    later directories are hidden as usual."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    dst.mkdir()
    for d in ("p", "q", "r"):
        (src / d).mkdir(parents=True)
        for f in ("a", "b"):
            (src / d / f).write_bytes(f"{d}/{f}".encode())
    made = fsops.make_dir

    def racing_make_dir(parent_fd: int, name: str, acl_inherited: bool = False) -> None:
        if name == "p" and not (dst / name).exists():
            (dst / name).mkdir()  # the other writer, just before us
            (dst / name / "theirs").write_bytes(b"kept")
            (dst / name / "a").write_bytes(b"an older a")
        made(parent_fd, name, acl_inherited)

    monkeypatch.setattr(fsops, "make_dir", racing_make_dir)
    run = _Run(src, dst)
    try:
        run.plan("", False)
        assert len(_tmp_names(dst)) == 2  # q and r hidden: not tried in place again
        for d in ("p", "q", "r"):
            run.plan(d, True)
            run.land(d, "a", "b")
        run.dest.finish(True)
        assert run.dest.failures == []
    finally:
        run.close()
    assert _tmp_names(dst) == []
    for d in ("p", "q", "r"):
        assert (dst / d / "a").read_bytes() == f"{d}/a".encode() and (dst / d / "b").read_bytes() == f"{d}/b".encode()
    assert sorted(os.listdir(dst / "p")) == ["a", "b", "theirs"]


def test_a_run_cut_short_that_ends_after_the_rerun_changes_nothing(tmp_path: Path) -> None:
    """A push session stopped (its client SIGSTOPped) while a rerun completes, then ended (the
    client killed): the stopped session moved its hidden directories into the rerun's tree at
    its end, and every directory it touched kept a new mtime (QA: 364-628 `.d..t......` lines
    from `rsync -anci` on a deep tree, 10 of 10 runs). Its hidden directory is stale once a
    newer run's directory has the name: it is removed, and its parent's times kept."""
    run1 = _setup(tmp_path, {"d/a": b"a" * 10, "d/b": b"b" * 10, "d/e/x": b"x"})
    src, dst = run1.src, run1.dst
    p = dst / "p"
    try:
        run1.start()
        run1.plan_new("p/d", "p/d/e")
        run1.land("p/d", "a")
        run1.land("p/d/e", "x")  # e in place inside run1's still hidden d
        (src / "o").mkdir()  # the rerun's first new directory (in place): its d is hidden
        run2 = _Run(src, dst)
        try:
            run2.plan("", False)
            run2.plan("o", True)
            run2.plan("p", False)
            run2.plan_new("p/d", "p/d/e")
            run2.land("p/d/e", "x")
            run2.land("p/d", "a", "b")
            run2.dest.finish(True)
            assert run2.dest.failures == []
        finally:
            run2.close()
        times = {q: (q.stat().st_mtime_ns, stat.S_IMODE(q.stat().st_mode)) for q in (dst, p, p / "d", p / "d" / "e")}
    finally:
        run1.close()  # its end, after the rerun's
    assert _tmp_names(dst) == []
    assert {q: (q.stat().st_mtime_ns, stat.S_IMODE(q.stat().st_mode)) for q in times} == times
    assert times[p / "d"][0] == (src / "p" / "d").stat().st_mtime_ns
    got = sorted(str(q.relative_to(dst)) for q in dst.rglob("*"))
    assert got == sorted(str(q.relative_to(src)) for q in src.rglob("*"))


def test_a_run_that_died_during_the_rerun_leaves_nothing_hidden(tmp_path: Path) -> None:
    """A pulling client stopped, and killed while the rerun ran (QA: 3 of 4): the rerun's
    scans left its hidden directories alone (a live run held them), and once it died nobody
    removed them: 171-1,621 `.blit-*.tmp` stayed, whole files inside, extras to `rsync -anci
    --delete`. The rerun now removes, at its end, those whose run died meanwhile."""
    run1 = _setup(tmp_path, {"d/a": b"a" * 10, "d/b": b"b" * 10})
    src, dst = run1.src, run1.dst
    p = dst / "p"
    run1.start()
    run1.plan("p/d", True)
    run1.land("p/d", "a")
    assert len(_tmp_names(dst)) == 1
    (src / "o").mkdir()
    run2 = _Run(src, dst)
    try:
        run2.plan("", False)
        run2.plan("o", True)
        run2.plan("p", False)  # run1's hidden d: held, left alone
        run2.plan("p/d", True)
        run2.land("p/d", "a", "b")
        run1.dest.dirs.close()  # run1 killed: its fds (and flocks) gone, nothing moved into place
        run1.source.close()
        os.close(run1.dest.root_fd)
        run2.dest.finish(True)
        assert run2.dest.failures == []
        assert _tmp_names(dst) == []
        assert p.stat().st_mtime_ns == (src / "p").stat().st_mtime_ns
    finally:
        run2.close()
    got = sorted(str(q.relative_to(dst)) for q in dst.rglob("*"))
    assert got == sorted(str(q.relative_to(src)) for q in src.rglob("*"))


def test_a_dead_runs_directory_goes_and_a_live_ones_stays(tmp_path: Path) -> None:
    """A destination scan removes temporary directories whose run died, and leaves alone (and
    out of a mirror's extras) one that a live run still holds."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "keep").mkdir(parents=True)
    dst.mkdir()
    stale = dst / ".blit-0123456789abcdef.tmp"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "partial").write_bytes(b"half")
    dfd = _open(dst)
    live, held = fsops.make_hidden_dir(dfd)
    (dst / live / "landing").write_bytes(b"another run's file")
    try:
        run = _Run(src, dst, TreeSpec(operation="mirror"))
        try:
            run.plan("", False)
            run.dest.finish(True)
        finally:
            run.close()
        assert not stale.exists()
        assert (dst / live / "landing").read_bytes() == b"another run's file"
        assert run.dest.files_deleted == 0
    finally:
        os.close(held)
        os.close(dfd)
    assert sorted(os.listdir(dst)) == sorted([live, "keep"])


def test_move_and_dry_run_hide_nothing(tmp_path: Path) -> None:
    """A move removes source files as their copies land: those copies must be in place, not
    in a directory the next run could remove. A dry run makes nothing."""
    src = tmp_path / "src"
    _tree(src, {"d/a": b"a"})
    for spec in (TreeSpec(operation="move"), TreeSpec(dry_run=True)):
        dst = tmp_path / f"dst-{spec.operation}-{spec.dry_run}"
        dst.mkdir()
        run = _Run(src, dst, spec)
        try:
            run.plan("", False)
            if not spec.dry_run:
                run.land("", "first")
            run.plan("p", not spec.dry_run)
            assert _tmp_names(dst) == []
            assert (dst / "p" / "d").is_dir() != spec.dry_run
        finally:
            run.close()


def test_a_daemon_killed_mid_push_leaves_nothing_a_rerun_keeps(tmp_path: Path) -> None:
    """SIGKILL of the daemon while it fills hidden directories: whatever is under a real name
    is whole; the rerun (a new daemon on the same module) removes what the dead one hid and
    lands an identical tree, with no temporary left."""
    src = tmp_path / "src"
    for i in range(6000):
        d = src / f"d{i // 200:02d}"
        if i % 200 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:05d}").write_bytes(b"%05d" % i * 400)
    with run_daemon_process(tmp_path) as d:
        module = d.modules["data"]
        dst = module / "t"
        proc = subprocess.Popen([*blit_cmd(), "copy", f"{src}/", f"127.0.0.1:{d.port}:/data/t/"], env=d.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not (dst.exists() and any(n.startswith(fsops.TMP_PREFIX) for n in os.listdir(dst))):
                assert proc.poll() is None and time.monotonic() < deadline, "the push never hid a directory"
                time.sleep(0.002)
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
        finally:
            proc.wait(120)
        assert proc.returncode != 0
        for p in dst.rglob("f*"):  # under a real name, or inside a hidden directory: whole
            if not any(part.startswith(fsops.TMP_PREFIX) for part in p.relative_to(dst).parts):
                assert p.read_bytes() == (src / p.relative_to(dst)).read_bytes(), p
    with run_daemon_process(tmp_path) as d2:  # the same module, state and certificate
        r = subprocess.run([*blit_cmd(), "copy", f"{src}/", f"127.0.0.1:{d2.port}:/data/t/"], env=d2.env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
    assert temporaries_after_settling(dst) == []
    got = sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
    assert got == sorted(str(p.relative_to(src)) for p in src.rglob("*"))
    for p in src.rglob("f*"):
        assert (dst / p.relative_to(src)).read_bytes() == p.read_bytes()
