"""Tests for blit.ffi: the cffi backend and the stdlib fallback against os.copy_file_range.

Plain synchronous tests (no Trio). Linux only: the macOS and Windows backends are untested here
beyond parsing their declarations. The reflink test that must answer True makes an XFS loop
mount, so it needs root, a free loop device and mkfs.xfs (Debian: xfsprogs).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

import blit.ffi
from blit.ffi import _errnos, fallback, linux
from blit.ffi._linux_cffi import ffi as linux_ffi

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux backends")

SHM = Path("/dev/shm")
KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(params=["linux", "fallback"])
def backend(request: pytest.FixtureRequest) -> types.ModuleType:
    """Each implementation of the interface: the cffi one and the stdlib one."""
    return {"linux": linux, "fallback": fallback}[request.param]


class CopyFn(Protocol):
    def __call__(
        self,
        src: int,
        dst: int,
        count: int,
        src_off: int | None = ...,
        dst_off: int | None = ...,
        /,
    ) -> int: ...


COPIERS: dict[str, CopyFn] = {
    "linux": linux.copy_file_range,  # the interface's choice: os.copy_file_range underneath
    "linux-cffi": linux.copy_file_range_cffi,
    "fallback": fallback.copy_file_range,
}


@pytest.fixture(params=sorted(COPIERS))
def copier(request: pytest.FixtureRequest) -> CopyFn:
    """Each copy_file_range: the exported one, the cffi binding, the stdlib fallback."""
    return COPIERS[request.param]


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not SHM.is_dir():
        pytest.skip("no /dev/shm on this machine")
    path = Path(os.path.realpath(SHM)) / f"blit-test-ffi-{os.getpid()}"
    path.mkdir()
    yield path
    shutil.rmtree(path)


def _fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (longest mount point prefix)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(
                best
            ):
                best, kind = point, fields[2]
    return kind


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _copy_all(copy: CopyFn, src_fd: int, dst_fd: int, step: int) -> int:
    total = 0
    while True:
        done = copy(src_fd, dst_fd, step)
        if done == 0:
            return total
        total += done


class _Fds:
    """Opens files and closes them all at teardown."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def open(self, path: Path | str, flags: int, mode: int = 0o644) -> int:
        fd = os.open(path, flags, mode)
        self.fds.append(fd)
        return fd

    def close_all(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def fds() -> Iterator[_Fds]:
    opened = _Fds()
    yield opened
    opened.close_all()


RW_NEW = os.O_RDWR | os.O_CREAT | os.O_TRUNC


# --- backend choice and import ---------------------------------------------------------------


def test_linux_picks_the_cffi_backend_with_both_fast_paths() -> None:
    assert blit.ffi.BACKEND == "linux-cffi"
    assert blit.ffi.copy_file_range is linux.copy_file_range
    assert blit.ffi.reflink is linux.reflink
    assert blit.ffi.HAVE_COPY_FILE_RANGE is True
    assert blit.ffi.HAVE_REFLINK is True


def test_public_names_are_the_documented_interface() -> None:
    assert sorted(blit.ffi.__all__) == [
        "BACKEND",
        "COPY_FALLBACK_ERRNOS",
        "HAVE_COPY_FILE_RANGE",
        "HAVE_REFLINK",
        "REFLINK_UNSUPPORTED_ERRNOS",
        "copy_file_range",
        "link_fd",
        "reflink",
        "syncfs",
    ]
    for name in blit.ffi.__all__:
        assert hasattr(fallback, name) or name.endswith("ERRNOS")


def _run_python(code: str) -> str:
    src = str(Path(blit.ffi.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


# blit/__init__.py and its imports are not blit.ffi's business: the subprocess gives blit.ffi an
# empty parent package so that only what blit.ffi itself imports is counted.
_BARE_PARENT = (
    "import sys, types, pathlib, importlib.util; "
    "spec = importlib.util.find_spec('blit'); "
    "bare = types.ModuleType('blit'); bare.__path__ = list(spec.submodule_search_locations); "
    "sys.modules['blit'] = bare; "
)


def test_importing_blit_ffi_parses_no_c_and_loads_no_other_platform() -> None:
    out = _run_python(
        _BARE_PARENT + "before = set(sys.modules); import blit.ffi; "
        "new = set(sys.modules) - before; "
        "print(sorted(m for m in new if m.split('.')[0] in "
        "('pycparser', 'cffi', 'typing') or m in ('blit.ffi.windows', 'blit.ffi.macos')))"
    )
    assert out == "[]"


def test_without_cffi_the_stdlib_fallback_is_chosen() -> None:
    out = _run_python(
        _BARE_PARENT + "sys.modules['_cffi_backend'] = None; import blit.ffi; "
        "print(blit.ffi.BACKEND, blit.ffi.HAVE_COPY_FILE_RANGE, blit.ffi.HAVE_REFLINK)"
    )
    assert out == "fallback True True"


def test_generated_cffi_module_matches_the_cdef(tmp_path: Path) -> None:
    from blit.ffi import _build_linux

    target = tmp_path / "_linux_cffi.py"
    _build_linux.build(target)
    assert target.read_text() == _build_linux.TARGET.read_text(), (
        "run python src/blit/ffi/_build_linux.py and commit _linux_cffi.py"
    )


@pytest.mark.parametrize("platform", ["windows", "macos"])
def test_untested_platform_cdefs_parse(platform: str) -> None:
    import cffi

    from blit.ffi import macos, windows

    module = {"windows": windows, "macos": macos}[platform]
    ffi = cffi.FFI()
    # cffi predefines DWORD and BOOL only on Windows.
    prelude = "typedef uint32_t DWORD; typedef int BOOL;" if platform == "windows" else ""
    ffi.cdef(prelude + module.CDEF)


# --- copy_file_range -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4 * KiB + 7, 3 * MiB + 123])
def test_copy_file_range_copies_exactly_what_the_stdlib_copies(
    copier: CopyFn, tmp_path: Path, fds: _Fds, size: int
) -> None:
    data = os.urandom(size)
    _write(tmp_path / "src", data)
    src = fds.open(tmp_path / "src", os.O_RDONLY)
    dst = fds.open(tmp_path / "dst", RW_NEW)
    oracle_src = fds.open(tmp_path / "src", os.O_RDONLY)
    oracle_dst = fds.open(tmp_path / "oracle", RW_NEW)

    assert _copy_all(copier, src, dst, 1 * MiB) == size
    assert _copy_all(os.copy_file_range, oracle_src, oracle_dst, 1 * MiB) == size
    assert (tmp_path / "dst").read_bytes() == (tmp_path / "oracle").read_bytes() == data
    # offsets None: the file positions moved past the copied bytes
    assert os.lseek(src, 0, os.SEEK_CUR) == size
    assert os.lseek(dst, 0, os.SEEK_CUR) == size


@pytest.mark.parametrize(
    ("count", "src_off", "dst_off"),
    [(3000, 1000, 5), (1, 0, 0), (10_000, 95_000, 0), (4096, 4096, 8192), (50, None, 17)],
)
def test_copy_file_range_with_offsets_matches_the_stdlib_and_keeps_positions(
    copier: CopyFn,
    tmp_path: Path,
    fds: _Fds,
    count: int,
    src_off: int | None,
    dst_off: int | None,
) -> None:
    data = os.urandom(100_000)
    _write(tmp_path / "src", data)
    _write(tmp_path / "dst", b"\xee" * 20_000)
    _write(tmp_path / "oracle", b"\xee" * 20_000)
    src = fds.open(tmp_path / "src", os.O_RDONLY)
    dst = fds.open(tmp_path / "dst", os.O_RDWR)
    oracle_src = fds.open(tmp_path / "src", os.O_RDONLY)
    oracle_dst = fds.open(tmp_path / "oracle", os.O_RDWR)
    for fd in (src, oracle_src):
        os.lseek(fd, 10, os.SEEK_SET)

    got = copier(src, dst, count, src_off, dst_off)
    expected = os.copy_file_range(oracle_src, oracle_dst, count, src_off, dst_off)

    assert got == expected == min(count, len(data) - (10 if src_off is None else src_off))
    assert (tmp_path / "dst").read_bytes() == (tmp_path / "oracle").read_bytes()
    start = 10 if src_off is None else src_off
    at = 0 if dst_off is None else dst_off
    assert (tmp_path / "dst").read_bytes()[at : at + got] == data[start : start + got]
    # an explicit offset leaves that file's position alone; None advances it
    assert os.lseek(src, 0, os.SEEK_CUR) == (10 + got if src_off is None else 10)
    assert os.lseek(dst, 0, os.SEEK_CUR) == (got if dst_off is None else 0)


def test_copy_file_range_returns_zero_at_eof(copier: CopyFn, tmp_path: Path, fds: _Fds) -> None:
    _write(tmp_path / "src", b"x" * 100)
    src = fds.open(tmp_path / "src", os.O_RDONLY)
    dst = fds.open(tmp_path / "dst", RW_NEW)
    assert copier(src, dst, 1000, 100, 0) == 0
    assert copier(src, dst, 1000, 5000, 0) == 0
    assert copier(src, dst, 1000) == 100
    assert copier(src, dst, 1000) == 0
    assert copier(src, dst, 0) == 0
    assert os.path.getsize(tmp_path / "dst") == 100


def test_copy_file_range_on_a_closed_fd_raises_ebadf(
    copier: CopyFn, tmp_path: Path, fds: _Fds
) -> None:
    _write(tmp_path / "src", b"x" * 100)
    src = fds.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", RW_NEW)
    os.close(dst)
    with pytest.raises(OSError) as info:
        copier(src, dst, 100)
    assert info.value.errno == errno.EBADF
    assert info.value.strerror == os.strerror(errno.EBADF)
    assert type(info.value) is OSError


def test_copy_file_range_into_append_only_fd_raises_ebadf(
    copier: CopyFn, tmp_path: Path, fds: _Fds
) -> None:
    _write(tmp_path / "src", b"x" * 100)
    src = fds.open(tmp_path / "src", os.O_RDONLY)
    dst = fds.open(tmp_path / "dst", RW_NEW | os.O_APPEND)
    with pytest.raises(OSError) as info:
        copier(src, dst, 100)
    assert info.value.errno == errno.EBADF


def test_copy_file_range_into_a_pipe_raises_a_fallback_errno(
    copier: CopyFn, tmp_path: Path, fds: _Fds
) -> None:
    _write(tmp_path / "src", b"x" * 100)
    src = fds.open(tmp_path / "src", os.O_RDONLY)
    read_end, write_end = os.pipe()
    fds.fds += [read_end, write_end]
    with pytest.raises(OSError) as info:
        copier(src, write_end, 100)
    assert info.value.errno == errno.EINVAL
    assert info.value.errno in blit.ffi.COPY_FALLBACK_ERRNOS


def test_copy_file_range_across_filesystems_raises_a_fallback_errno(
    copier: CopyFn, tmp_path: Path, shm_dir: Path, fds: _Fds
) -> None:
    if os.stat(tmp_path).st_dev == os.stat(shm_dir).st_dev:
        pytest.skip("tmp_path is on /dev/shm: no second filesystem")
    _write(shm_dir / "src", b"x" * 100)
    src = fds.open(shm_dir / "src", os.O_RDONLY)
    dst = fds.open(tmp_path / "dst", RW_NEW)
    try:
        done = copier(src, dst, 100)
    except OSError as exc:
        assert exc.errno in blit.ffi.COPY_FALLBACK_ERRNOS  # EXDEV on Linux >= 5.19
    else:
        assert done == 100  # kernels 5.3-5.18 copied across filesystems


def test_copy_file_range_rejects_negative_count(copier: CopyFn, tmp_path: Path, fds: _Fds) -> None:
    _write(tmp_path / "src", b"x")
    src = fds.open(tmp_path / "src", os.O_RDONLY)
    dst = fds.open(tmp_path / "dst", RW_NEW)
    with pytest.raises(ValueError):
        copier(src, dst, -1)


@pytest.mark.parametrize("without_pread", [False, True])
def test_emulated_copy_file_range_matches_the_stdlib(
    tmp_path: Path, fds: _Fds, monkeypatch: pytest.MonkeyPatch, without_pread: bool
) -> None:
    """The read/write path macOS and Windows use (Windows also lacks pread/pwrite)."""
    monkeypatch.setattr(fallback, "HAVE_COPY_FILE_RANGE", False)
    monkeypatch.setattr(fallback, "EMULATED_CHUNK", 64 * KiB)
    if without_pread:
        monkeypatch.delattr(os, "pread")
        monkeypatch.delattr(os, "pwrite")
    data = os.urandom(300 * KiB + 5)
    _write(tmp_path / "src", data)
    src = fds.open(tmp_path / "src", os.O_RDONLY)
    dst = fds.open(tmp_path / "dst", RW_NEW)
    assert fallback.copy_file_range(src, dst, 10 * MiB) == 64 * KiB  # one chunk per call
    assert _copy_all(fallback.copy_file_range, src, dst, 10 * MiB) == len(data) - 64 * KiB
    assert (tmp_path / "dst").read_bytes() == data

    os.lseek(src, 7, os.SEEK_SET)
    os.lseek(dst, 9, os.SEEK_SET)
    assert fallback.copy_file_range(src, dst, 100, 1000, 50) == 100
    assert os.lseek(src, 0, os.SEEK_CUR) == 7
    assert os.lseek(dst, 0, os.SEEK_CUR) == 9
    assert (tmp_path / "dst").read_bytes()[50:150] == data[1000:1100]
    assert fallback.copy_file_range(src, dst, 100, len(data), 0) == 0


# --- reflink ---------------------------------------------------------------------------------


def test_reflink_answers_false_on_tmpfs(
    backend: types.ModuleType, shm_dir: Path, fds: _Fds
) -> None:
    assert _fs_type(shm_dir) == "tmpfs"
    _write(shm_dir / "src", b"data" * 1000)
    src = fds.open(shm_dir / "src", os.O_RDONLY)
    dst = fds.open(shm_dir / "dst", RW_NEW)
    assert backend.reflink(src, dst) is False
    assert os.path.getsize(shm_dir / "dst") == 0


def test_reflink_on_tmp_path_answers_by_filesystem(
    backend: types.ModuleType, tmp_path: Path, fds: _Fds
) -> None:
    data = os.urandom(100 * KiB)
    _write(tmp_path / "src", data)
    src = fds.open(tmp_path / "src", os.O_RDONLY)
    dst = fds.open(tmp_path / "dst", RW_NEW)
    cloned = backend.reflink(src, dst)
    if _fs_type(tmp_path) in ("ext2", "ext3", "ext4", "tmpfs"):
        assert cloned is False
        assert os.path.getsize(tmp_path / "dst") == 0
    else:  # XFS or btrfs /tmp: either answer is allowed, a True must be a real clone
        assert cloned is False or (tmp_path / "dst").read_bytes() == data


def test_reflink_across_filesystems_answers_false(
    backend: types.ModuleType, tmp_path: Path, shm_dir: Path, fds: _Fds
) -> None:
    _write(shm_dir / "src", b"x" * 100)
    src = fds.open(shm_dir / "src", os.O_RDONLY)
    dst = fds.open(tmp_path / "dst", RW_NEW)
    assert backend.reflink(src, dst) is False


def test_reflink_into_a_pipe_answers_false(
    backend: types.ModuleType, tmp_path: Path, fds: _Fds
) -> None:
    _write(tmp_path / "src", b"x" * 100)
    src = fds.open(tmp_path / "src", os.O_RDONLY)
    read_end, write_end = os.pipe()
    fds.fds += [read_end, write_end]
    assert backend.reflink(src, write_end) is False


def test_reflink_with_unusable_fds_raises_ebadf(
    backend: types.ModuleType, tmp_path: Path, fds: _Fds
) -> None:
    _write(tmp_path / "src", b"x" * 100)
    src = fds.open(tmp_path / "src", os.O_RDONLY)
    read_only_dst = fds.open(tmp_path / "dst", os.O_RDONLY | os.O_CREAT)
    with pytest.raises(OSError) as info:
        backend.reflink(src, read_only_dst)
    assert info.value.errno == errno.EBADF
    closed = os.open(tmp_path / "dst", os.O_WRONLY)
    os.close(closed)
    with pytest.raises(OSError) as info:
        backend.reflink(src, closed)
    assert info.value.errno == errno.EBADF


def test_reflink_from_a_directory_raises(
    backend: types.ModuleType, tmp_path: Path, fds: _Fds
) -> None:
    src = fds.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    dst = fds.open(tmp_path / "dst", RW_NEW)
    with pytest.raises(OSError) as info:
        backend.reflink(src, dst)
    # XFS/btrfs say EISDIR; ext4 has no reflink at all and says EOPNOTSUPP first.
    if info.value.errno != errno.EISDIR:
        assert _fs_type(tmp_path) not in ("xfs", "btrfs")


@pytest.mark.parametrize(
    ("err", "answer"),
    [
        (errno.EOPNOTSUPP, False),
        (errno.EXDEV, False),
        (errno.EINVAL, False),
        (errno.ENOTTY, False),
        (errno.EPERM, False),
        (errno.EIO, "raise"),
        (errno.ENOSPC, "raise"),
        (errno.EISDIR, "raise"),
        (errno.EROFS, "raise"),
    ],
)
def test_reflink_errno_policy(err: int, answer: object, tmp_path: Path, fds: _Fds) -> None:
    src = fds.open(tmp_path / "src", RW_NEW)
    dst = fds.open(tmp_path / "dst", RW_NEW)
    if answer == "raise":
        with pytest.raises(OSError) as info:
            _errnos.reflink_failed(err, src, dst)
        assert info.value.errno == err
    else:
        assert _errnos.reflink_failed(err, src, dst) is answer


def test_reflink_ebadf_from_the_filesystem_with_usable_fds_answers_false(
    tmp_path: Path, fds: _Fds
) -> None:
    """ioctl_ficlone(2): EBADF also means "this filesystem cannot reflink"; O_APPEND dst too."""
    src = fds.open(tmp_path / "src", RW_NEW)
    dst = fds.open(tmp_path / "dst", RW_NEW)
    appending = fds.open(tmp_path / "dst", os.O_WRONLY | os.O_APPEND)
    assert _errnos.reflink_failed(errno.EBADF, src, dst) is False
    assert _errnos.reflink_failed(errno.EBADF, src, appending) is False
    o_path = fds.open(tmp_path / "dst", os.O_PATH)
    with pytest.raises(OSError):
        _errnos.reflink_failed(errno.EBADF, src, o_path)


def _loop_mount_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root: cannot make a loop mount"
    try:
        subprocess.run(["losetup", "-f"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"no free loop device ({exc})"
    return None


@pytest.fixture(scope="module")
def xfs_reflink_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh XFS with reflink=1 on a loop device, unmounted afterwards."""
    reason = _loop_mount_unavailable()
    if reason is not None:
        pytest.skip(reason)
    mkfs = shutil.which("mkfs.xfs") or (
        "/usr/sbin/mkfs.xfs" if os.path.exists("/usr/sbin/mkfs.xfs") else None
    )
    if mkfs is None:
        pytest.fail("mkfs.xfs not found: install the Debian package xfsprogs")
    base = tmp_path_factory.mktemp("xfs")
    image, mount_point = base / "image", base / "mnt"
    mount_point.mkdir()
    with open(image, "wb") as f:
        f.truncate(300 * MiB)  # sparse; XFS's minimum size
    subprocess.run([mkfs, "-q", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
        image.unlink()


@pytest.mark.root
def test_reflink_clones_on_xfs_with_identical_content(
    backend: types.ModuleType, xfs_reflink_dir: Path, fds: _Fds
) -> None:
    assert _fs_type(xfs_reflink_dir) == "xfs"
    data = os.urandom(3 * MiB + 4321)
    _write(xfs_reflink_dir / f"src-{backend.BACKEND}", data)
    src = fds.open(xfs_reflink_dir / f"src-{backend.BACKEND}", os.O_RDONLY)
    dst_path = xfs_reflink_dir / f"dst-{backend.BACKEND}"
    dst = fds.open(dst_path, RW_NEW)
    os.write(dst, b"old content that the clone replaces")

    assert backend.reflink(src, dst) is True
    assert dst_path.read_bytes() == data
    assert os.lseek(src, 0, os.SEEK_CUR) == 0
    # the clone is independent: changing it leaves the source alone
    os.pwrite(dst, b"changed", 0)
    assert (xfs_reflink_dir / f"src-{backend.BACKEND}").read_bytes() == data
    # the same inode cannot be cloned onto itself: "unsupported", not an error
    same = fds.open(xfs_reflink_dir / f"src-{backend.BACKEND}", os.O_RDWR)
    assert backend.reflink(src, same) is False


@pytest.mark.root
def test_copy_file_range_on_xfs_copies_exactly(
    copier: CopyFn, xfs_reflink_dir: Path, fds: _Fds
) -> None:
    data = os.urandom(2 * MiB + 1)
    _write(xfs_reflink_dir / "cfr-src", data)
    src = fds.open(xfs_reflink_dir / "cfr-src", os.O_RDONLY)
    dst_path = xfs_reflink_dir / "cfr-dst"
    dst = fds.open(dst_path, RW_NEW)
    assert copier(src, dst, len(data) + 100, 0, 0) == len(data)
    assert dst_path.read_bytes() == data


# --- syncfs ----------------------------------------------------------------------------------


def test_syncfs_flushes_a_real_fd(backend: types.ModuleType, tmp_path: Path, fds: _Fds) -> None:
    fd = fds.open(tmp_path / "f", RW_NEW)
    os.write(fd, b"x" * 4096)
    assert backend.syncfs(fd) is None
    dir_fd = fds.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    assert backend.syncfs(dir_fd) is None


def test_syncfs_on_a_closed_fd_raises_ebadf(backend: types.ModuleType, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", RW_NEW)
    os.close(fd)
    with pytest.raises(OSError) as info:
        backend.syncfs(fd)
    assert info.value.errno == errno.EBADF


# --- link_fd ---------------------------------------------------------------------------------


def _tmpfile(fds: _Fds, directory: Path, data: bytes, extra: int = 0) -> int:
    fd = fds.open(directory, os.O_TMPFILE | os.O_RDWR | extra, 0o600)
    os.write(fd, data)
    return fd


@pytest.fixture
def fresh_link_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test decides the link method anew; the process-wide choice is restored after."""
    monkeypatch.setattr(linux, "_link_method", None)


@pytest.mark.parametrize("where", ["tmp_path", "shm"])
@pytest.mark.parametrize("name", ["named", b"named-bytes"])
@pytest.mark.usefixtures("fresh_link_method")
def test_link_fd_names_an_o_tmpfile_file(
    backend: types.ModuleType,
    tmp_path: Path,
    shm_dir: Path,
    fds: _Fds,
    where: str,
    name: str | bytes,
) -> None:
    directory = tmp_path if where == "tmp_path" else shm_dir
    fd = _tmpfile(fds, directory, b"hello tmpfile")
    dir_fd = fds.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    backend.link_fd(fd, dir_fd, name)
    path = directory / os.fsdecode(name)
    assert path.read_bytes() == b"hello tmpfile"
    assert os.stat(path).st_ino == os.fstat(fd).st_ino


@pytest.mark.usefixtures("fresh_link_method")
def test_link_fd_refuses_an_existing_name(
    backend: types.ModuleType, tmp_path: Path, fds: _Fds
) -> None:
    (tmp_path / "taken").write_bytes(b"keep me")
    fd = _tmpfile(fds, tmp_path, b"new")
    dir_fd = fds.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(FileExistsError) as info:
        backend.link_fd(fd, dir_fd, "taken")
    assert info.value.errno == errno.EEXIST
    assert (tmp_path / "taken").read_bytes() == b"keep me"


@pytest.mark.usefixtures("fresh_link_method")
def test_link_fd_of_an_o_excl_tmpfile_raises_enoent(
    backend: types.ModuleType, tmp_path: Path, fds: _Fds
) -> None:
    fd = _tmpfile(fds, tmp_path, b"never linkable", extra=os.O_EXCL)
    dir_fd = fds.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(FileNotFoundError):
        backend.link_fd(fd, dir_fd, "name")
    assert not (tmp_path / "name").exists()


@pytest.mark.usefixtures("fresh_link_method")
def test_link_fd_across_filesystems_raises_exdev(
    backend: types.ModuleType, tmp_path: Path, shm_dir: Path, fds: _Fds
) -> None:
    if os.stat(tmp_path).st_dev == os.stat(shm_dir).st_dev:
        pytest.skip("tmp_path is on /dev/shm: no second filesystem")
    fd = _tmpfile(fds, shm_dir, b"x")
    dir_fd = fds.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(OSError) as info:
        backend.link_fd(fd, dir_fd, "name")
    assert info.value.errno == errno.EXDEV


@pytest.mark.usefixtures("fresh_link_method")
def test_link_fd_uses_at_empty_path_when_permitted(tmp_path: Path, fds: _Fds) -> None:
    fd = _tmpfile(fds, tmp_path, b"x")
    dir_fd = fds.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    linux.link_fd(fd, dir_fd, "a")
    # root (CAP_DAC_READ_SEARCH), or Linux >= 6.10 for the process that opened the file
    if os.geteuid() == 0:
        assert linux._link_method == "empty_path"
    else:
        assert linux._link_method in ("empty_path", "proc")


class _NoEmptyPathLibC:
    """A libc whose linkat answers ENOENT, as the kernel does without CAP_DAC_READ_SEARCH."""

    def __init__(self) -> None:
        self.linkat_calls = 0

    def linkat(self, *args: object) -> int:
        self.linkat_calls += 1
        linux_ffi.errno = errno.ENOENT
        return -1


@pytest.mark.usefixtures("fresh_link_method")
def test_link_fd_falls_back_to_proc_once_and_remembers(
    tmp_path: Path, fds: _Fds, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _NoEmptyPathLibC()
    monkeypatch.setattr(linux, "_libc", fake)
    dir_fd = fds.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    for name in ("first", "second", "third"):
        linux.link_fd(_tmpfile(fds, tmp_path, name.encode()), dir_fd, name)
        assert (tmp_path / name).read_bytes() == name.encode()
    assert linux._link_method == "proc"
    assert fake.linkat_calls == 1  # decided once, then /proc/self/fd directly


@pytest.mark.parametrize("walk", ["openat2", "components"])
def test_open_rel_follows_no_symlink_on_the_way(tmp_path: Path, walk: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory of the tree swapped for a symlink while a run walks it: opening a path
    through it fails (ELOOP), it never reaches what the link points to (issue: a run read
    and wrote outside its trees)."""
    from blit import fsops
    from blit.ffi import scan as cscan

    if walk == "components":
        monkeypatch.setattr(cscan, "HAVE_CMPDIR", False)
    elif not cscan.HAVE_CMPDIR:
        pytest.skip("the C module is not built")  # the other case covers the walk
    (tmp_path / "root" / "a" / "b").mkdir(parents=True)
    (tmp_path / "outside" / "b").mkdir(parents=True)
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    (tmp_path / "root" / "rel").symlink_to("a")
    root = os.open(tmp_path / "root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = fsops.open_rel(root, "a/b")
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "root" / "a" / "b"))
        os.close(fd)
        for rel in ("link/b", "rel/b", "link", "a/../link/b"):
            with pytest.raises(OSError) as info:
                os.close(fsops.open_rel(root, rel))
            assert info.value.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR), rel
        fd = os.open(tmp_path / "root" / "a", os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(30):  # 6,000 bytes: longer than one open takes, so opened in chunks
            os.mkdir("d" * 200, dir_fd=fd)
            nfd = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(fd)
        os.close(fsops.open_rel(root, "a/" + "/".join(["d" * 200] * 30)))
    finally:
        os.close(root)


def test_a_fifo_in_a_listed_files_place_is_refused_not_waited_on(tmp_path: Path) -> None:
    """A file replaced by a FIFO between the scan and the copy: the open must not block (it hung
    a local run), the file is refused as "not a regular file" (the C batch hands it to Python)."""
    import threading

    from blit import fsops
    from blit.ffi import scan as cscan

    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"data")
    m = fsops.meta_of(os.stat(tmp_path / "src" / "f"))
    (tmp_path / "src" / "f").unlink()
    os.mkfifo(tmp_path / "src" / "f")
    sfd = os.open(tmp_path / "src", os.O_RDONLY | os.O_DIRECTORY)
    dfd = os.open(tmp_path / "dst", os.O_RDONLY | os.O_DIRECTORY)
    results: list[object] = []

    def attempt() -> None:
        if cscan.HAVE_CMPDIR:
            results.append(cscan.copy_new(sfd, dfd, [(b"f", m)], True))
        try:
            fsops.copy_small(sfd, "f", dfd, "f", m, False)
        except OSError as exc:
            results.append(exc.strerror)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    try:
        assert not t.is_alive(), "the copy waited on the FIFO"
        assert results == ([[cscan.PYTHON]] if cscan.HAVE_CMPDIR else []) + ["not a regular file"]
        assert os.listdir(tmp_path / "dst") == []
    finally:
        if t.is_alive():  # unblock it: a writer opens the FIFO
            os.close(os.open(tmp_path / "src" / "f", os.O_WRONLY | os.O_NONBLOCK))
        os.close(sfd)
        os.close(dfd)


def test_a_small_file_that_shrank_since_it_was_listed_is_refused_and_one_that_grew_lands(tmp_path: Path) -> None:
    """A plain file listed at 4,000 bytes that holds 1,000 when it is copied: the C batch hands
    it back, the Python path refuses it (it landed the short file with the listed mtime, exit
    0); nothing is left at the destination. One that grew lands what was read."""
    from blit import fsops
    from blit.ffi import scan as cscan

    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    (tmp_path / "src" / "short").write_bytes(b"s" * 4000)
    (tmp_path / "src" / "long").write_bytes(b"l" * 4000)
    listed = {n: fsops.meta_of(os.stat(tmp_path / "src" / n)) for n in ("short", "long")}
    (tmp_path / "src" / "short").write_bytes(b"s" * 1000)
    (tmp_path / "src" / "long").write_bytes(b"l" * 9000)
    sfd = os.open(tmp_path / "src", os.O_RDONLY | os.O_DIRECTORY)
    dfd = os.open(tmp_path / "dst", os.O_RDONLY | os.O_DIRECTORY)
    try:
        if cscan.HAVE_CMPDIR:
            assert cscan.copy_new(sfd, dfd, [(b"short", listed["short"])], True) == [cscan.PYTHON]
            assert os.listdir(tmp_path / "dst") == []
        with pytest.raises(OSError, match="file changed size while being read"):
            fsops.copy_small(sfd, "short", dfd, "short", listed["short"], False)
        assert os.listdir(tmp_path / "dst") == []
        if cscan.HAVE_CMPDIR:
            assert cscan.copy_new(sfd, dfd, [(b"long", listed["long"])], True) == [9000]
            os.unlink(tmp_path / "dst" / "long")
        assert fsops.copy_small(sfd, "long", dfd, "long", listed["long"], False) == 9000
        assert (tmp_path / "dst" / "long").read_bytes() == b"l" * 9000
    finally:
        os.close(sfd)
        os.close(dfd)


def test_a_sparse_file_that_shrank_since_it_was_listed_is_refused(tmp_path: Path) -> None:
    """Its extents stop at the new end: padding it back to the listed size would land zeros
    the file never held (it did, locally)."""
    from blit import fsops

    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        f.write(b"HEAD" * 2048)
        f.seek(2 << 20)
        f.write(b"TAIL" * 2048)
    size = p.stat().st_size
    os.truncate(p, 4096)
    sfd = os.open(p, os.O_RDONLY)
    dfd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="file changed size while being read"):
            fsops.copy_sparse(sfd, dfd, size)
    finally:
        os.close(sfd)
        os.close(dfd)


def test_a_live_runs_temporary_file_is_left_alone_by_another_runs_scan(tmp_path: Path) -> None:
    """Concurrent pushes into one directory: one run's scan removed another's temporary file
    between its link and its rename (`copy: No such file or directory`). A writer holds a
    shared flock on its temporary (hold_tmp; the C landing too); a scan removes only one that
    nobody holds (a run that died)."""
    from blit import fsops

    d = tmp_path / "d"
    d.mkdir()
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    live, dead = fsops.new_tmp_name(), fsops.new_tmp_name()
    held = os.open(d / live, os.O_WRONLY | os.O_CREAT, 0o600)
    fsops.hold_tmp(held)
    (d / dead).write_bytes(b"left by a run that was killed")
    (d / "real").write_bytes(b"x")
    try:
        entries, _ = fsops.scan(dfd)
        assert sorted(fsops.without_tmp(dfd, entries, False)) == ["real"]
        assert sorted(os.listdir(d)) == sorted([live, "real"])
        os.close(held)
        held = -1
        entries, _ = fsops.scan(dfd)
        assert sorted(fsops.without_tmp(dfd, entries, False)) == ["real"]
        assert os.listdir(d) == ["real"]
    finally:
        if held >= 0:
            os.close(held)
        os.close(dfd)
