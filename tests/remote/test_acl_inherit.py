"""A remote destination directory with a default ACL: what lands in it carries the source's
ACLs and modes only, not what it would inherit (as rsync -aA and the local engine), pushed and
pulled: small files (the C landing is bypassed there), a large file, a hard-link group, a
FIFO, a new directory and what lands in it, a file replaced under --checksum, and a
destination created for the run under such a directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import ACL_DEFAULT, ACL_FILE, MiB, assert_same_tree, rmtree, snapshot, write_file

from .conftest import DaemonProcess
from .test_cli_transfer import blit, url

pytestmark = pytest.mark.root
T = 1_400_000_000_000_000_000


def _acl_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, "system.posix_acl_default", ACL_DEFAULT)


def _source(src: Path) -> None:
    """src/shared has a default ACL; nothing in it has an ACL of its own but with_acl."""
    _acl_dir(src / "shared")
    files = {"plain": (b"no ACL of its own\n", 0o644), "private": (b"private\n", 0o600),
             "big.bin": (os.urandom(5 * MiB), 0o644), "linked": (b"two names\n", 0o640)}  # fmt: skip
    for name, (data, mode) in files.items():
        write_file(src / "shared" / name, data)
        os.removexattr(src / "shared" / name, "system.posix_acl_access")
        os.chmod(src / "shared" / name, mode)
    os.link(src / "shared/linked", src / "shared/linked2")
    write_file(src / "shared/with_acl", b"an ACL of its own\n")
    os.setxattr(src / "shared/with_acl", "system.posix_acl_access", ACL_FILE)
    os.mkfifo(src / "shared/fifo")
    os.removexattr(src / "shared/fifo", "system.posix_acl_access")
    os.chmod(src / "shared/fifo", 0o644)
    os.mkdir(src / "shared/newdir")
    for n in ("system.posix_acl_access", "system.posix_acl_default"):
        os.removexattr(src / "shared/newdir", n)
    os.chmod(src / "shared/newdir", 0o755)
    write_file(src / "shared/newdir/inner", b"inner\n", mode=0o644)
    for p in (src / "shared/newdir", src / "shared", src):
        os.utime(p, ns=(T, T))


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_entries_landing_under_a_default_acl_keep_the_sources_acls_and_modes(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    d = daemon_process
    local = tmp_path / "local"
    module = d.modules["data"]
    src, dst = (local / "src", module / "dst") if direction == "push" else (module / "src", local / "dst")
    _source(src)
    src_url = f"{src}/" if direction == "push" else url(d, "data/src/")
    dst_url = url(d, "data/dst/") if direction == "push" else f"{dst}/"
    try:
        # The destination's copy of "shared" exists already, with the same default ACL.
        r = blit(d, "copy", "--exclude", "shared/*", src_url, dst_url)
        assert r.returncode == 0, r.stderr
        assert os.getxattr(dst / "shared", "system.posix_acl_default") == ACL_DEFAULT
        r = blit(d, "copy", src_url, dst_url)
        assert r.returncode == 0, r.stderr
        assert_same_tree(snapshot(src), snapshot(dst))

        # --checksum replaces a file of the same size and time whose content differs.
        p = src / "shared/private"
        write_file(p, b"PRIVATE\n", mode=0o600)
        os.removexattr(p, "system.posix_acl_access")
        os.chmod(p, 0o600)
        os.utime(p, ns=(T, T))
        for q in (src / "shared", src):
            os.utime(q, ns=(T, T))
        os.utime(dst / "shared/private", ns=(T, T))
        r = blit(d, "copy", "--checksum", src_url, dst_url)
        assert r.returncode == 0, r.stderr
        assert (dst / "shared/private").read_bytes() == b"PRIVATE\n"
        assert_same_tree(snapshot(src), snapshot(dst))

        # A destination created for the run (mkdir -p) inside a directory with a default ACL.
        parent = (module if direction == "push" else local) / "acl_parent"
        _acl_dir(parent)
        made_url = url(d, "data/acl_parent/made/") if direction == "push" else f"{parent}/made/"
        newdir_url = f"{src}/shared/newdir/" if direction == "push" else url(d, "data/src/shared/newdir/")
        r = blit(d, "copy", newdir_url, made_url)
        assert r.returncode == 0, r.stderr
        assert_same_tree(snapshot(src / "shared/newdir"), snapshot(parent / "made"))
    finally:
        for p in (local, module / "src", module / "dst", module / "acl_parent"):
            rmtree(p)


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_special_files_carry_their_acls(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """A FIFO's ACL lands with it, and an up-to-date FIFO whose ACL changed is fixed in place."""
    d = daemon_process
    local = tmp_path / "local"
    module = d.modules["data"]
    src, dst = (local / "src", module / "dst") if direction == "push" else (module / "src", local / "dst")
    src.mkdir(parents=True)
    write_file(src / "keep", b"k\n")
    os.mkfifo(src / "fifo")
    os.setxattr(src / "fifo", "system.posix_acl_access", ACL_FILE)
    os.utime(src, ns=(T, T))
    src_url = f"{src}/" if direction == "push" else url(d, "data/src/")
    dst_url = url(d, "data/dst/") if direction == "push" else f"{dst}/"
    try:
        r = blit(d, "copy", src_url, dst_url)
        assert r.returncode == 0, r.stderr
        assert_same_tree(snapshot(src), snapshot(dst))
        os.removexattr(src / "fifo", "system.posix_acl_access")
        os.chmod(src / "fifo", 0o600)
        os.utime(src, ns=(T, T))
        before = os.lstat(dst / "fifo").st_ino
        r = blit(d, "copy", src_url, dst_url)
        assert r.returncode == 0, r.stderr
        assert_same_tree(snapshot(src), snapshot(dst))
        assert os.lstat(dst / "fifo").st_ino == before
    finally:
        for p in (local, module / "src", module / "dst"):
            rmtree(p)
