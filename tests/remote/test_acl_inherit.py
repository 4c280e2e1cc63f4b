"""A remote destination directory with a default ACL: what lands in it carries the source's
ACLs and modes only, not what it would inherit (as rsync -aA and the local engine), pushed and
pulled: small files (the C landing is bypassed there), a large file, a hard-link group, a
FIFO, a new directory and what lands in it, a file replaced under --checksum, and a
destination created for the run under such a directory. And a setgid destination directory: what
lands below it has the source's group, new subdirectories' files included (locally too)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import ACL_DEFAULT, ACL_FILE, ACL_TREE_T, acl_dir, assert_same_tree, make_acl_inheritance_tree, rmtree, snapshot, write_file

from .conftest import DaemonProcess
from .test_cli_transfer import blit, url

pytestmark = pytest.mark.root
T = ACL_TREE_T


def _sides(d: DaemonProcess, tmp_path: Path, direction: str) -> tuple[Path, Path, Path, Path, str, str]:
    """local dir, module dir, source and destination trees, and how blit names them."""
    local, module = tmp_path / "local", d.modules["data"]
    if direction == "push":
        return local, module, local / "src", module / "dst", f"{local}/src/", url(d, "data/dst/")
    return local, module, module / "src", local / "dst", url(d, "data/src/"), f"{local}/dst/"


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_entries_landing_under_a_default_acl_keep_the_sources_acls_and_modes(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    d = daemon_process
    local, module, src, dst, src_url, dst_url = _sides(d, tmp_path, direction)
    make_acl_inheritance_tree(src)
    os.utime(src, ns=(T, T))
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
        acl_dir(parent)
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
    local, module, src, dst, src_url, dst_url = _sides(d, tmp_path, direction)
    src.mkdir(parents=True)
    write_file(src / "keep", b"k\n")
    os.mkfifo(src / "fifo")
    os.setxattr(src / "fifo", "system.posix_acl_access", ACL_FILE)
    os.utime(src, ns=(T, T))
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


@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_files_in_new_directories_under_a_setgid_destination_keep_the_sources_group(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """mkdir in a setgid directory makes a setgid directory of that group, so a file created in
    a new subdirectory gets it too: the owner must be set even when it is the writer's own."""
    d = daemon_process
    local, module, src, dst, src_url, dst_url = _sides(d, tmp_path, "pull" if direction == "pull" else "push")
    if direction == "local":
        dst, dst_url = local / "dst", f"{local}/dst/"
    for rel in ("top", "sub/f", "sub/deeper/g"):
        write_file(src / rel, rel.encode())
    os.chown(src, 0, 0)
    dst.mkdir(parents=True)
    os.chown(dst, 0, 5678)
    os.chmod(dst, 0o2775)
    try:
        r = blit(d, "copy", src_url, dst_url)
        assert r.returncode == 0, r.stderr
        got = {str(p.relative_to(dst)): (p.stat().st_uid, p.stat().st_gid, p.stat().st_mode & 0o7777) for p in dst.rglob("*")}
        want = {str(p.relative_to(src)): (0, 0, p.stat().st_mode & 0o7777) for p in src.rglob("*")}
        assert got == want
    finally:
        rmtree(src)
        rmtree(dst)
