"""Move: copy, confirm, then remove the source; never remove a source entry whose copy failed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import (
    NOBODY,
    Symlink,
    assert_same_tree,
    chown_tree,
    describe_output,
    make_bulk_tree,
    make_full_tree,
    make_tree,
    rmtree,
    run_blit,
    snapshot,
    stderr_lines,
    summary_of,
)

pytestmark = pytest.mark.usefixtures("blit_exe")

TREE = {
    "a.txt": "a\n",
    "big.bin": os.urandom(3 * 1024 * 1024),
    "sub/": {"b.txt": "b\n", "deeper/": {"c.txt": "c\n"}},
    "empty/": {},
    "link": Symlink("a.txt"),
    "dangling": Symlink("nowhere"),
}


def test_move_dir_form_removes_the_source(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    expected = snapshot(src)
    run_blit("move", src, tmp_path / "dst", check=0)
    assert_same_tree(expected, snapshot(tmp_path / "dst"))
    assert not os.path.lexists(src), f"source still there: {os.listdir(src)}"


def test_move_contents_form_empties_the_source(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    expected = snapshot(src, include_root=False)
    run_blit("move", f"{src}/", tmp_path / "dst", check=0)
    assert_same_tree(expected, snapshot(tmp_path / "dst", include_root=False))
    # `SRC/` moves the contents: the directory itself may stay, but empty.
    assert not os.path.lexists(src) or os.listdir(src) == []


def test_move_of_the_full_tree_lands_it_exactly(tmp_path: Path) -> None:
    src = make_full_tree(tmp_path / "src")
    expected = snapshot(src)
    run_blit("move", src, tmp_path / "dst", check=0)
    assert_same_tree(expected, snapshot(tmp_path / "dst"))
    assert not os.path.lexists(src)


def test_move_across_filesystems_lands_the_full_tree_exactly(tmp_path: Path) -> None:
    """/dev/shm is a tmpfs: rename(2) cannot do it, so this is copy + confirm + remove."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem at /dev/shm")
    src = make_full_tree(tmp_path / "src")
    expected = snapshot(src)
    dst = Path(f"/dev/shm/blit-test-move-{os.getpid()}")
    try:
        run_blit("move", src, dst, check=0)
        assert_same_tree(expected, snapshot(dst))
        assert not os.path.lexists(src)
    finally:
        rmtree(dst)


def test_move_of_a_single_file(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "s", {"f.txt": "payload\n"})
    os.chmod(src / "f.txt", 0o640)
    expected = snapshot(src / "f.txt")
    (tmp_path / "d").mkdir()
    run_blit("move", src / "f.txt", tmp_path / "d", check=0)
    assert_same_tree(expected, snapshot(tmp_path / "d/f.txt"))
    assert not os.path.lexists(src / "f.txt")
    assert src.is_dir()  # only the file moved

    make_tree(src, {"g.txt": "other\n"})
    expected = snapshot(src / "g.txt")
    run_blit("move", src / "g.txt", tmp_path / "renamed.txt", check=0)
    assert_same_tree(expected, snapshot(tmp_path / "renamed.txt"))
    assert not os.path.lexists(src / "g.txt")


def test_move_onto_an_up_to_date_destination_still_removes_the_source(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    dst = tmp_path / "dst"
    run_blit("copy", f"{src}/", dst, check=0)
    expected = snapshot(dst)
    run_blit("move", f"{src}/", dst, check=0)
    assert_same_tree(expected, snapshot(dst))
    assert not os.path.lexists(src) or os.listdir(src) == []


def test_move_of_a_dangling_symlink_moves_the_link(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "s", {"dangling": Symlink("no/such/target")})
    expected = snapshot(src / "dangling")
    run_blit("move", src / "dangling", tmp_path / "moved", check=0)
    assert_same_tree(expected, snapshot(tmp_path / "moved"))
    assert not os.path.lexists(src / "dangling")


def test_move_onto_an_existing_destination_merges(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"new.txt": "new\n", "same.txt": "from source\n",
                                       "sub/": {"s.txt": "s\n"}})  # fmt: skip
    dst = make_tree(tmp_path / "dst", {"keep.txt": "already here\n", "same.txt": "old\n",
                                       "sub/": {"other.txt": "other\n"}})  # fmt: skip
    src_snap = snapshot(src, include_root=False)
    run_blit("move", f"{src}/", dst, check=0)
    after = snapshot(dst, include_root=False)
    for p, e in src_snap.items():
        if e.kind == "file":
            assert after[p].sha256 == e.sha256, p
    assert (dst / "keep.txt").read_bytes() == b"already here\n"
    assert (dst / "sub/other.txt").read_bytes() == b"other\n"
    assert not os.path.lexists(src) or os.listdir(src) == []


@pytest.mark.root
def test_move_keeps_a_source_file_whose_copy_failed(nobody_tmp: Path) -> None:
    src = make_tree(nobody_tmp / "src", {"ok1.txt": "ok\n", "sub/": {"ok2.txt": "ok\n",
                                         "secret.txt": "unreadable\n"}, "ok3.bin": os.urandom(9999)})  # fmt: skip
    chown_tree(src, NOBODY, NOBODY)
    os.chmod(src / "sub/secret.txt", 0o000)
    expected = snapshot(src, include_root=False)
    dst = nobody_tmp / "dst"
    proc = run_blit("move", f"{src}/", dst, as_nobody=True)
    assert proc.returncode == 3, describe_output(proc)
    lines = stderr_lines(proc)
    assert any("secret.txt" in ln and "Permission denied" in ln for ln in lines), lines
    # The failed file stays where it was, with its directory; the others moved.
    assert (src / "sub/secret.txt").exists()
    assert not (dst / "sub/secret.txt").exists()
    for rel in ("ok1.txt", "sub/ok2.txt", "ok3.bin"):
        assert not (src / rel).exists(), f"{rel} was copied but not removed from the source"
        assert snapshot(dst / rel)[b"."].sha256 == expected[rel.encode()].sha256


def test_move_dry_run_moves_nothing(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    before = snapshot(src)
    proc = run_blit("move", "--dry-run", src, tmp_path / "dst", check=0)
    assert_same_tree(before, snapshot(src))
    assert not os.path.lexists(tmp_path / "dst")
    assert b"a.txt" in proc.stdout


# --------------------------------------------------------------------------------------------
# Hard links: a move lands the source's link structure, whatever the order directories are
# read in (a member removed early would change the link count its peers are judged by).


def _make_linked_tree(root: Path, busy_dirs: int = 30, files_per_dir: int = 40) -> Path:
    """Hard-link groups within one directory, across two, and spread over many directories
    (with enough plain files around them that the directories are read by different workers
    at different times)."""
    src = make_tree(root, {"one/": {"x": "same directory\n"}, "a/": {"x": "two directories\n"},
                           "b/": {}})  # fmt: skip
    os.link(src / "one/x", src / "one/y")
    os.link(src / "a/x", src / "b/y")
    for i in range(busy_dirs):
        d = src / f"d{i:02d}" / "e" / "f"
        d.mkdir(parents=True)
        for j in range(files_per_dir):
            (src / f"d{i:02d}" / f"f{j}").write_text(f"{i} {j}\n")
        (d / "z").write_text(f"pair {i}\n")
    half = busy_dirs // 2
    for i in range(half):  # pairs: d00/e/f/z = d15/z2, d01/e/f/z = d16/z2, ...
        os.link(src / f"d{i:02d}/e/f/z", src / f"d{i + half:02d}/z2")
    (src / "d00/wide").write_text("one inode in six directories\n")
    for i in range(5, busy_dirs, 5):
        os.link(src / "d00/wide", src / f"d{i:02d}/e/wide")
    return src


def _assert_moved(expected: dict, dst: Path, src: Path) -> None:  # type: ignore[type-arg]
    assert_same_tree(expected, snapshot(dst, include_root=False))  # "links" compares the groups
    groups = {e.links for e in expected.values() if e.links}
    assert len(groups) == 18, groups
    for group in groups:
        st = [os.stat(dst / os.fsdecode(p)) for p in group]
        assert len({s.st_ino for s in st}) == 1 and st[0].st_nlink == len(group), group
    assert not os.path.lexists(src) or os.listdir(src) == [], sorted(os.listdir(src))


@pytest.mark.parametrize("where", ["same filesystem", "onto an existing directory", "across filesystems"])
def test_move_keeps_hard_link_groups(tmp_path: Path, where: str) -> None:
    """Same filesystem onto a free name is one rename(2); onto an existing directory and to
    another filesystem (a tmpfs) it is copy, link, then remove the sources."""
    for trial in range(3):  # the order directories are read in varies from run to run
        src = _make_linked_tree(tmp_path / f"src{trial}")
        expected = snapshot(src, include_root=False)
        if where == "across filesystems":
            if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
                pytest.skip("no second filesystem at /dev/shm")
            dst = Path(f"/dev/shm/blit-test-move-links-{os.getpid()}")
        else:
            dst = tmp_path / f"dst{trial}"
        if where != "same filesystem":
            dst.mkdir()
        try:
            summary = summary_of(run_blit("move", "--json", src if where == "same filesystem" else f"{src}/", dst,
                                          check=0))  # fmt: skip
            assert summary["failures"] == [], summary
            if "strategy" in summary:  # undocumented; says whether this case took the path it names
                assert (summary["strategy"] == "rename") == (where == "same filesystem"), summary
            _assert_moved(expected, dst, src)
        finally:
            if where == "across filesystems":
                rmtree(dst)


@pytest.mark.slow
def test_move_keeps_hard_link_groups_read_by_worker_processes(tmp_path: Path) -> None:
    """A tree large enough for worker processes: the groups' directories are read by different
    processes while the coordinator links and removes."""
    src = _make_linked_tree(tmp_path / "src")
    make_bulk_tree(src, xattrs=True)  # 20,000 files, 200 directories; one more group: bulk/*/linked
    expected = snapshot(src, include_root=False)
    dst = tmp_path / "dst"
    dst.mkdir()
    summary = summary_of(run_blit("move", "--json", f"{src}/", dst, check=0))
    assert summary["failures"] == [], summary
    if "strategy" in summary:  # undocumented; says whether this test reached its target
        assert "process" in summary["strategy"], summary["strategy"]
    assert_same_tree(expected, snapshot(dst, include_root=False))
    linked = [os.stat(dst / f"bulk/d{d:03d}/linked") for d in (0, 100, 199)]
    assert len({s.st_ino for s in linked}) == 1 and linked[0].st_nlink == 3
    assert not os.path.lexists(src) or os.listdir(src) == []


@pytest.mark.root
def test_move_keeps_the_hard_link_member_that_could_not_land(nobody_tmp: Path) -> None:
    src = make_tree(nobody_tmp / "src", {"a/": {"x": "one inode\n"}, "b/": {}, "c/": {}})
    os.link(src / "a/x", src / "b/y")
    os.link(src / "a/x", src / "c/z")
    chown_tree(src, NOBODY, NOBODY)
    dst = make_tree(nobody_tmp / "dst", {"a/": {}, "b/": {}, "c/": {}})
    chown_tree(dst, NOBODY, NOBODY)
    os.chown(dst / "c", 0, 0)  # root's: nobody cannot land c/z
    proc = run_blit("move", f"{src}/", dst, as_nobody=True)
    assert proc.returncode == 3, describe_output(proc)
    assert [ln for ln in stderr_lines(proc) if "c/z" in ln] in (
        ["blit: c/z: copy: Permission denied"], ["blit: c/z: link: Permission denied"]), describe_output(proc)  # fmt: skip
    assert os.stat(dst / "a/x").st_ino == os.stat(dst / "b/y").st_ino and os.stat(dst / "a/x").st_nlink == 2
    assert not os.path.lexists(dst / "c/z")
    # The member that did not land stays, with its data; the others left the source.
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*")) == ["c", "c/z"]
    assert (src / "c/z").read_text() == "one inode\n"


def test_a_source_that_changed_since_it_was_listed_stays(tmp_path: Path) -> None:
    """Move removes a source only if it is still what was listed: written to (size, mtime) or
    replaced (another inode) since, it stays, a failure (exit 3), as a remote move keeps it."""
    from blit import fsops

    d = tmp_path / "d"
    d.mkdir()
    for name in ("same", "grown", "touched", "replaced"):
        (d / name).write_text("x")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        listed = {n: fsops.meta_of(os.stat(n, dir_fd=fd, follow_symlinks=False)) for n in os.listdir(fd)}
        (d / "grown").write_text("xy")
        os.utime(d / "touched", ns=(1, 1))
        os.rename(d / "same", d / "tmp")
        (d / "replaced").unlink()
        os.rename(d / "tmp", d / "replaced")  # another inode, same size and mtime as listed
        (d / "same").write_text("x")
        os.utime(d / "same", ns=(listed["same"].st_atime_ns, listed["same"].st_mtime_ns))
        with pytest.raises(OSError, match="changed since it was copied; kept"):
            fsops.unlink_unchanged(fd, "same", listed["same"])  # a new inode under the name
        for name in ("grown", "touched", "replaced"):
            with pytest.raises(OSError, match="changed since it was copied; kept"):
                fsops.unlink_unchanged(fd, name, listed[name])
        os.utime(d / "replaced", ns=(listed["replaced"].st_atime_ns, listed["replaced"].st_mtime_ns))
        fsops.unlink_unchanged(fd, "replaced", fsops.meta_of(os.stat(d / "replaced")))
        assert sorted(os.listdir(d)) == ["grown", "same", "touched"]
    finally:
        os.close(fd)


def test_move_keeps_a_file_appended_to_after_it_landed(tmp_path: Path) -> None:
    """The data appended between the copy and the removal is never lost (it was, locally)."""
    import subprocess
    import time

    from helpers import BLIT

    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    for i in range(30_000):
        (src / "d" / f"f{i:05d}").write_bytes(b"original %d\n" % i)
    proc = subprocess.Popen([BLIT, "move", f"{src}/", f"{dst}/"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (dst / "d" / "f00000").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the first file never landed"
            time.sleep(0.001)
        fd = os.open(src / "d" / "f00000", os.O_WRONLY | os.O_APPEND)  # no O_CREAT: still the source
        os.write(fd, b"APPENDED\n")
        os.close(fd)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, (out, err)
    assert err.decode().splitlines() == ["blit: d/f00000: remove source: changed since it was copied; kept"]
    assert (src / "d" / "f00000").read_bytes() == b"original 0\nAPPENDED\n"
    assert os.listdir(src / "d") == ["f00000"]


@pytest.fixture
def bind_mount(tmp_path: Path):  # type: ignore[no-untyped-def]
    """bind(source, where): mount --bind (root only), unmounted afterwards."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    mounts: list[Path] = []

    def bind(source: Path, where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(source), str(where)], check=True)
        mounts.append(where)
        return where

    yield bind
    for m in reversed(mounts):
        subprocess.run(["umount", str(m)], check=False)


@pytest.mark.root
@pytest.mark.parametrize(
    ("op", "src_form", "dst_form"),
    [("move", "src/", "bnd/"), ("move", "src/", "bnd"), ("move", "src", "bnd"), ("copy", "src/", "bnd/sub/x"),
     ("move", "src/sub/", "bnd/sub/")],
    ids=["same dir", "same dir, no slash", "into itself", "copy inside itself", "a subdirectory"],
)  # fmt: skip
def test_a_destination_that_is_the_source_by_another_path_is_refused(tmp_path: Path, bind_mount, op: str, src_form: str, dst_form: str) -> None:  # type: ignore[no-untyped-def]
    """A bind mount of the source is the same directory under other real paths: a move onto it
    judged every file up to date and removed them, the only copies (exit 0); a copy into it
    nested itself until killed. Compared by device and inode, as cp does."""
    src = make_tree(tmp_path / "src", TREE)
    bind_mount(src, tmp_path / "bnd")
    before = snapshot(src)
    proc = run_blit(op, src_form, dst_form, cwd=tmp_path)
    assert proc.returncode == 2, describe_output(proc)
    (line,) = stderr_lines(proc)
    assert "the same directory" in line or "is inside the source" in line, line
    assert_same_tree(before, snapshot(src))


@pytest.mark.root
def test_a_move_whose_destination_holds_the_source_by_another_path_keeps_it(tmp_path: Path, bind_mount) -> None:  # type: ignore[no-untyped-def]
    """dst/sub is a bind mount of src/sub: each file there is its own destination. rsync skips
    removing it; so does blit, one failure each, and nothing is lost."""
    src = make_tree(tmp_path / "src", TREE)
    (src / "sub" / "void").mkdir()  # an empty directory: emptied sources go, not this one
    dst = tmp_path / "dst"
    (dst / "sub").mkdir(parents=True)
    bind_mount(src / "sub", dst / "sub")
    proc = run_blit("move", f"{src}/", f"{dst}/")
    assert proc.returncode == 3, describe_output(proc)
    lines = stderr_lines(proc)
    assert "blit: sub/b.txt: remove source: source and destination are the same file (another path to it: a bind mount, a hard link); kept" in lines, lines
    assert (src / "sub/b.txt").read_text() == "b\n" and (src / "sub/deeper/c.txt").read_text() == "c\n"
    assert (src / "sub/void").is_dir()
    assert not (src / "a.txt").exists() and (dst / "a.txt").read_text() == "a\n"


@pytest.mark.root
def test_move_keeps_an_up_to_date_source_whose_metadata_did_not_land(nobody_tmp: Path) -> None:
    """An up-to-date file whose mode could not be fixed at the destination was removed from the
    source anyway: a private file then lived on only as a world-readable copy."""
    src, dst = nobody_tmp / "src", nobody_tmp / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("private\n")
    (dst / "f").write_text("private\n")
    os.utime(src / "f", ns=(10**18, 10**18))
    os.utime(dst / "f", ns=(10**18, 10**18))
    chown_tree(src, NOBODY, NOBODY)
    os.chown(dst, NOBODY, NOBODY)
    os.chmod(src / "f", 0o600)
    os.chmod(dst / "f", 0o644)  # root's: nobody cannot chmod it
    proc = run_blit("move", f"{src}/", f"{dst}/", as_nobody=True)
    assert proc.returncode == 3, describe_output(proc)
    assert any(ln.startswith("blit: f: metadata: ") for ln in stderr_lines(proc)), describe_output(proc)
    assert (src / "f").read_text() == "private\n"


def test_a_directory_is_not_put_in_place_of_a_dangling_symlink(tmp_path: Path) -> None:
    """cp -a and rsync refuse; blit replaced the user's symlink by the directory."""
    src = make_tree(tmp_path / "src", TREE)
    os.symlink("nowhere", tmp_path / "dang")
    for op in ("copy", "mirror", "move"):
        proc = run_blit(op, src, tmp_path / "dang")
        assert proc.returncode == 2, describe_output(proc)
        assert os.readlink(tmp_path / "dang") == "nowhere"
    assert (src / "a.txt").exists()


def test_reaches_goes_up_the_real_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsops.reaches (the nesting check of every topology, R52) walked the path as written: a
    symlink into the source, a relative path (a daemon started with `--root .` inside the
    source) or `..` in a module path made it miss the source (a copy nested) or meet it where
    it is not (`src/conf/../../other` refused as inside src)."""
    from blit import fsops

    src = tmp_path / "src"
    (src / "d" / "conf").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(src / "d")
    st = os.stat(src)
    ident = (st.st_dev, st.st_ino)
    assert fsops.reaches(os.fsencode(tmp_path / "link" / "x"), ident) == "inside"
    assert fsops.reaches(os.fsencode(src / "d" / "conf" / ".." / ".." / ".." / "other" / "x"), ident) is None
    assert fsops.reaches(os.fsencode(src / "d" / ".."), ident) == "same"
    monkeypatch.chdir(src / "d")
    assert fsops.reaches(b"x/y", ident) == "inside"
    assert fsops.reaches(b"..", ident) == "same"


@pytest.mark.root
@pytest.mark.parametrize(
    ("op", "src_form", "dst_form", "skipped"),
    [("copy", "src", "bnd/", "src/sub/src"), ("copy", "src/", "bnd/new", "sub/new"), ("mirror", "src/", "bnd/new/", "sub/new"),
     ("move", "src/", "bnd/new", "sub/new")],
)  # fmt: skip
def test_a_destination_inside_a_bind_mount_of_a_source_subdirectory_is_not_copied_into_itself(  # type: ignore[no-untyped-def]
    tmp_path: Path, bind_mount, op: str, src_form: str, dst_form: str, skipped: str
) -> None:
    """bnd is a bind mount of src/sub: the destination bnd/x is src/sub/x, which no path check
    and no walk up from it can see. The copy nested until killed (8,000+ levels). The source
    walk now leaves out the directory that is the destination (one failure, exit 3), as cp's
    "cannot copy a directory into itself"; everything else lands once."""
    src = make_tree(tmp_path / "src", TREE)
    bind_mount(src / "sub", tmp_path / "bnd")
    proc = run_blit(op, src_form, dst_form, cwd=tmp_path, timeout=60)
    assert proc.returncode == 3, describe_output(proc)
    assert stderr_lines(proc) == [f"blit: {skipped}: copy: it is the destination, by another path (a bind mount): not copied into itself"]
    top = src / "sub" / Path(dst_form).name.rstrip("/") if dst_form != "bnd/" else src / "sub" / "src"
    assert (top / "a.txt").read_text() == "a\n" and (top / "sub" / "b.txt").read_text() == "b\n"
    assert not (top / "sub" / top.name / "sub").exists()  # one level, not a nest
