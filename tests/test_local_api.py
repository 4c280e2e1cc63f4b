"""The library API for Trio applications: `await blit.copy(...)` / `mirror` / `move` land the
same trees as the CLI, return a Summary, and raise documented errors on bad input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import blit
from helpers import Symlink, assert_same_tree, make_full_tree, make_tree, snapshot, write_file

TREE = {"a.txt": "a\n", "sub/": {"b.bin": b"\x00" * 3000}, "link": Symlink("a.txt")}


async def test_copy_returns_a_summary_and_lands_the_full_tree(tmp_path: Path) -> None:
    src = make_full_tree(tmp_path / "src")
    summary = await blit.copy(f"{src}/", str(tmp_path / "dst"))
    assert isinstance(summary, blit.Summary)
    assert summary.exit_code == 0 and summary.failures == []
    assert summary.files_copied > 0
    assert_same_tree(src, tmp_path / "dst")
    again = await blit.copy(f"{src}/", str(tmp_path / "dst"))
    assert again.files_copied == 0 and again.bytes_copied == 0


async def test_mirror_deletes_extras(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    dst = make_tree(tmp_path / "dst", {**TREE, "extra.txt": "x", "extra_dir/": {"y": "y"}})
    summary = await blit.mirror(f"{src}/", str(dst))
    assert summary.exit_code == 0, summary.failures
    assert_same_tree(src, dst)


async def test_move_removes_the_source(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    expected = snapshot(src)
    await blit.move(str(src), str(tmp_path / "dst"))
    assert not os.path.lexists(src)
    assert_same_tree(expected, snapshot(tmp_path / "dst"))


async def test_bad_input_raises_a_usage_error_and_changes_nothing(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    before = snapshot(tmp_path)
    with pytest.raises(blit.UsageError):
        await blit.copy(str(tmp_path / "missing"), str(tmp_path / "dst"))
    with pytest.raises(blit.UsageError):
        await blit.copy(f"{src}/", str(src / "sub/inner"))
    with pytest.raises(blit.UsageError):
        await blit.mirror(f"{src}/", str(src))
    assert issubclass(blit.UsageError, blit.BlitError)
    assert_same_tree(before, snapshot(tmp_path))


async def test_options_select_compare_mode_and_filters(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"keep.c": "c\n", "drop.o": "o\n"})
    dst = tmp_path / "dst"
    opts = blit.Options(filters=[(False, "*.o")])
    await blit.copy(f"{src}/", str(dst), opts)
    assert sorted(os.listdir(dst)) == ["keep.c"]
    st = os.stat(dst / "keep.c")
    write_file(dst / "keep.c", b"C\n")
    os.utime(dst / "keep.c", ns=(st.st_atime_ns, st.st_mtime_ns))
    opts = blit.Options(compare=blit.Compare.CHECKSUM, filters=[(False, "*.o")])
    summary = await blit.copy(f"{src}/", str(dst), opts)
    assert summary.files_copied == 1
    assert (dst / "keep.c").read_bytes() == b"c\n"


async def test_a_directory_made_by_another_program_after_the_scan_is_merged_into(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A destination directory that appears between the scan and blit's mkdir (an app's
    `mkdir -p`, another run) is used as it is, as rsync does: it failed `mkdir: File exists`
    and nothing below it was copied (QA: 0 of 500 files, 4 of 4 runs)."""
    from blit import fsops

    src = make_tree(tmp_path / "src", {"z/f": "1\n", "z/sub/g": "2\n", "a": "x\n"})
    dst = tmp_path / "dst"
    dst.mkdir()
    real = fsops.make_dir

    def racing(parent_fd: int, name: str, acl_inherited: bool = False) -> None:
        os.mkdir(name, 0o777, dir_fd=parent_fd)  # the other program, just before us
        real(parent_fd, name, acl_inherited)

    monkeypatch.setattr(fsops, "make_dir", racing)
    summary = await blit.copy(f"{src}/", str(dst))
    assert summary.failures == [], summary.failures
    assert_same_tree(snapshot(src), snapshot(dst))


async def test_a_source_whose_first_entry_vanishes_during_the_readable_check_is_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source root's readability check stats one entry; one renamed away meanwhile (an
    atomic save's temporary) refused the whole run, `cannot read source ...: No such file or
    directory`, exit 1 (QA: 3 of 30 local runs, 12 of 30 pushes). The next entry does."""
    src = make_tree(tmp_path / "src", {"tmp1": "t\n", "keep": "k\n"})
    real = os.scandir
    calls = 0

    def scandir(path: object = ".") -> object:
        nonlocal calls
        calls += 1
        it = real(path)  # type: ignore[call-overload]
        if calls > 1:
            return it

        class Vanishing:
            def __enter__(self) -> Vanishing:
                return self

            def __exit__(self, *exc: object) -> None:
                it.close()

            def __iter__(self) -> object:
                for e in it:
                    if os.path.lexists(src / e.name):
                        os.unlink(src / e.name)  # the first one goes before its stat
                        yield e
                        break
                yield from it

        return Vanishing()

    monkeypatch.setattr(os, "scandir", scandir)
    summary = await blit.copy(f"{src}/", str(tmp_path / "dst"))
    monkeypatch.undo()
    assert summary.failures == [] and summary.files_copied == 1, summary
    assert os.listdir(tmp_path / "dst") == ["keep"] and (tmp_path / "dst/keep").read_bytes() == b"k\n"


async def test_a_cancelled_large_file_copy_lets_go_of_its_descriptors(tmp_path: Path) -> None:
    """A caller's cancel scope that ends a run inside a large file's copy: the thread still
    copying a chunk closes the run's descriptors and drops its unfinished temporary when the
    chunk is done. They were left open for the life of the process (QA: 7 cancels, 21 fds
    and 384 MiB held, invisible to du)."""
    import tempfile

    import trio

    # On tmpfs: a chunk's copy into a disk busy writing back can take seconds (the wait below).
    work = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else tmp_path))
    try:
        big = work / "src" / "big"
        big.parent.mkdir()
        with open(big, "wb") as f:
            for _ in range(96):
                f.write(os.urandom(1 << 20))
        fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
        before = fds()
        cut = 0
        for delay in (0.0, 0.005, 0.01, 0.02, 0.05, 0.1):  # 0: cut at its first checkpoint
            with trio.move_on_after(delay) as scope:
                await blit.copy(f"{big.parent}/", str(work / "dst"))
            cut += scope.cancelled_caught
            with trio.move_on_after(10):
                while fds() > before:
                    await trio.sleep(0.02)
            assert fds() == before, os.listdir("/proc/self/fd")
            if (work / "dst").exists():
                assert [p.name for p in (work / "dst").iterdir() if p.name != "big"] == []
            shutil.rmtree(work / "dst", ignore_errors=True)
        assert cut, "no run was cut short"
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def test_arguments_of_the_wrong_type_raise_a_usage_error_and_change_nothing(tmp_path: Path) -> None:
    """The API raises from blit.errors, whatever it is given (QA: `compare="checksum"` was
    ignored silently and a changed file of the same size and time was skipped; a bad filter
    list raised ValueError, options as a dict, an int destination or progress=object()
    AttributeError). A pathlib.Path or bytes is a path, as os functions take them."""
    src = make_tree(tmp_path / "src", {"f": "new\n"})
    dst = make_tree(tmp_path / "dst", {"f": "old\n"})
    os.utime(dst / "f", ns=(os.stat(src / "f").st_atime_ns, os.stat(src / "f").st_mtime_ns))
    before = snapshot(tmp_path)
    for kwargs, why in (
        ({"options": blit.Options(compare="bogus")}, "options.compare must be a blit.Compare"),  # type: ignore[arg-type]
        ({"options": blit.Options(filters=["*.o"])}, "options.filters must be a list of"),  # type: ignore[list-item]
        ({"options": blit.Options(dry_run="yes")}, "options.dry_run must be True or False"),  # type: ignore[arg-type]
        ({"options": {"dry_run": True}}, "options must be a blit.Options, not dict"),
        ({"progress": object()}, "progress must be a blit.Progress"),
        # QA pass 7: a stall of "5" raised a bare TypeError (after making the destination), 0 or -1
        # failed every file as stalled, NaN was taken
        ({"options": blit.Options(timeouts=blit.Timeouts(stall="5"))}, "options.timeouts.stall must be a number"),  # type: ignore[arg-type]
        ({"options": blit.Options(timeouts=blit.Timeouts(stall=0))}, "options.timeouts.stall must be a number"),
        ({"options": blit.Options(timeouts=blit.Timeouts(stall=float("nan")))}, "options.timeouts.stall must be a number"),
    ):
        with pytest.raises(blit.UsageError, match=why):
            await blit.copy(f"{src}/", str(dst), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(blit.UsageError, match="the destination must be a path"):
        await blit.copy(f"{src}/", 42)  # type: ignore[arg-type]
    assert_same_tree(before, snapshot(tmp_path))
    summary = await blit.copy(src / "f", os.fsencode(dst / "f"), blit.Options(compare="checksum"))  # type: ignore[arg-type]
    assert summary.files_copied == 1 and (dst / "f").read_text() == "new\n", summary
    summary = await blit.copy(src / "f", dst / "f", blit.Options(compare="ignore-times", secrets_file=b"/nonexistent"))  # type: ignore[arg-type]
    assert summary.files_copied == 1, summary  # --ignore-times by its flag's name; a bytes path taken
