"""Packed manifests (hello feature packed-manifest-1, decisions R21) and files named by
directory (send-dirs-1, R22): hostile input is a protocol error on either side, never a crash
and never a write or a read outside the module; both forms land the same."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from blit.errors import RemoteError, RemoteProtocolError
from blit.fsops import Meta
from blit.transport import protocol as p

from .conftest import Daemon

FILE = Meta(0o100644, 5, 1_700_000_000_000_000_001, 1_700_000_000_000_000_002, 0, 0, 7, 1, 1, 0, 8)


def _blob(names: list[bytes], metas: list[Meta] | None = None) -> bytes:
    return p.pack_entries(names, metas or [FILE] * len(names))


def _with_name(bad: bytes) -> bytes:
    """A two-entry manifest whose second name is `bad` (packed by hand: pack_entries joins)."""
    good = _blob([b"ok", b"zz"])
    return good[: -len(b"zz\0")] + bad + b"\0"


def _neg(column: int) -> bytes:
    blob = bytearray(_blob([b"a"]))
    pos = 4 + sum(w for _, w in p._PACK_COLUMNS[:column])
    blob[pos : pos + 8] = (-1).to_bytes(8, "little", signed=True)
    return bytes(blob)


HOSTILE = {
    "dotdot": _with_name(b".."),
    "dot": _with_name(b"."),
    "slash": _with_name(b"a/b"),
    "absolute": _with_name(b"/etc"),
    "empty name": _with_name(b""),
    "long name": _with_name(b"x" * 256),
    "nul in a name": _with_name(b"x\0y"),  # one name more than the count
    "missing last nul": _blob([b"ok", b"zz"])[:-1],
    "count above the names": (3).to_bytes(4, "little") + _blob([b"ok", b"zz"])[4:],
    "count below the names": (1).to_bytes(4, "little") + _blob([b"ok", b"zz"])[4:],
    "count above the limit": (p.MAX_LIST + 1).to_bytes(4, "little") + bytes(64),
    "huge count, short blob": (0xFFFFFFFF).to_bytes(4, "little"),
    "truncated columns": _blob([b"ok", b"zz"])[:50],
    "no count": b"\1\0",
    "names without entries": (0).to_bytes(4, "little") + b"x\0",
    "negative size": _neg(1),
    "negative blocks": _neg(10),
}


@pytest.mark.parametrize("blob", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_hostile_packed_manifest_is_a_protocol_error(blob: bytes) -> None:
    for msg in (
        p.TreeDir(transfer=1, rel=b"", dst_rel=b"", dst_new=False, entries=[], packed=blob),
        p.DirManifest(entries=[], incomplete=False, packed=blob),
    ):
        with pytest.raises(RemoteProtocolError, match="packed"):
            p.decode(type(msg), p.encode(msg))


def test_random_damage_never_passes_a_bad_entry() -> None:
    """Bytes flipped, cut or added anywhere: decoding raises RemoteProtocolError or yields only
    entries a SrcEntry array would pass."""
    rng = random.Random(21)
    names = [b"a", b"bb", b"..x", b"name with spaces", bytes(range(1, 47)).replace(b"/", b"_"), b"z" * 255]
    base = _blob(names, [FILE._replace(st_size=i, st_ino=i) for i in range(len(names))])
    for _ in range(3000):
        blob = bytearray(base)
        for _k in range(rng.randint(1, 4)):
            what = rng.random()
            i = rng.randrange(len(blob))
            if what < 0.6:
                blob[i] = rng.choice((0, 0x2E, 0x2F, 0xFF, rng.randrange(256)))
            elif what < 0.8:
                del blob[i:]
                if not blob:
                    blob += b"\0"
            else:
                blob[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        try:
            msg = p.decode(p.DirManifest, p.encode(p.DirManifest(entries=[], incomplete=False, packed=bytes(blob))))
        except RemoteProtocolError:
            continue
        assert msg.packed is None
        for e in msg.entries:
            p.check_name(e[0])  # raises on a bad name
            assert len(e) == 12 and e[2] >= 0 and e[11] >= 0
            assert all(type(v) is int for v in e[1:])


def test_both_forms_decode_to_the_same_entries() -> None:
    metas = [FILE, FILE._replace(st_mode=0o40755, st_size=0, st_mtime_ns=-5, st_uid=2**32 - 1, st_ino=2**64 - 1, st_rdev=2**64 - 1)]
    names = [b"f", b"caf\xe9"]
    packed = p.decode(p.DirManifest, p.encode(p.DirManifest(entries=[], incomplete=False, packed=_blob(names, metas))))
    arrays = p.decode(p.DirManifest, p.encode(p.DirManifest(entries=[[n, *m] for n, m in zip(names, metas)], incomplete=False)))
    assert [list(e) for e in packed.entries] == [list(e) for e in arrays.entries]


async def test_the_daemon_refuses_a_hostile_packed_push(daemon: Daemon, tmp_path: Path) -> None:
    async with daemon.session() as s:
        assert p.FEATURE_PACKED in s.peer.features
        opened = await s.call(p.OpenTree(module="data", path=b"", direction="push", operation="copy", compare=0))
        for name in ("dotdot", "slash", "absolute", "nul in a name", "count above the names", "negative size"):
            with pytest.raises(RemoteError) as info:
                await s.call(p.TreeDir(transfer=opened.transfer, rel=b"", dst_rel=b"", dst_new=False, entries=[], packed=HOSTILE[name]))
            assert info.value.code == "bad-request", (name, info.value)
        # The session is still usable: a good packed manifest plans as the CBOR form would.
        planned = await s.call(p.TreeDir(transfer=opened.transfer, rel=b"", dst_rel=b"", dst_new=False, entries=[], packed=_blob([b"good"])))
        assert p.unpack_needs(planned.packed_need)[1] == [b"good"]
    assert os.listdir(daemon.modules["data"]) == []
    assert not os.path.exists(daemon.modules["data"].parent / "etc")


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_a_peer_without_the_feature_gets_and_sends_cbor_manifests(
    daemon: Daemon, tmp_path: Path, direction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older client (no packed-manifest-1 in its hello): the daemon answers without it, the
    manifests travel as CBOR arrays, and the tree lands the same."""
    import trio

    from blit.transport.tree import TopJob, TreeSpec, pull_tree, push_tree

    from .treeutil import assert_same_tree, make_full_tree

    def old_hello(self: p.ClientSession) -> p.Hello:
        return p.Hello(protocol=p.PROTOCOL_VERSION, software=self.software, features=[p.FEATURE_DIR_DIGEST])

    monkeypatch.setattr(p.ClientSession, "hello", old_hello)
    sent: list[bool] = []
    real_encode = p.encode

    def watch(msg: p.Message) -> bytes:
        if isinstance(msg, (p.TreeDir, p.DirManifest)):
            sent.append(msg.packed is not None)
        return real_encode(msg)

    monkeypatch.setattr(p, "encode", watch)
    if direction == "push":
        src, dst = tmp_path / "src", daemon.modules["data"] / "dst"
    else:
        src, dst = daemon.modules["data"] / "src", tmp_path / "dst"
    await trio.to_thread.run_sync(make_full_tree, src)
    dst.mkdir()
    async with daemon.session() as s:
        assert p.FEATURE_PACKED not in s.peer.features
        if direction == "push":
            done = await push_tree(s, os.fsencode(src), "data", b"dst", TopJob(), TreeSpec())
        else:
            done = await pull_tree(s, "data", b"src", os.fsencode(dst), TopJob(), TreeSpec())
    assert not done.failures, done.failures
    assert sent and not any(sent)
    await trio.to_thread.run_sync(assert_same_tree, src, dst)


def _group(rel: bytes, ids: list[int], names: bytes) -> p.FileGroup:
    return p.FileGroup(rel=rel, ids=b"".join(i.to_bytes(4, "little") for i in ids), names=names)


async def test_the_daemon_refuses_hostile_file_groups(daemon: Daemon) -> None:
    src = daemon.modules["data"] / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    (src / "b").write_bytes(b"b")
    hostile = {
        "dotdot dir": (_group(b"../x", [1], b"a\0"), "path-refused"),
        "absolute dir": (_group(b"/etc", [1], b"passwd\0"), "path-refused"),
        "slash in a name": (_group(b"", [1], b"../etc/passwd\0"), "bad-request"),
        "dotdot name": (_group(b"", [1], b"..\0"), "bad-request"),
        "empty name": (_group(b"", [1, 2], b"a\0\0"), "bad-request"),
        "more names than ids": (_group(b"", [1], b"a\0b\0"), "bad-request"),
        "fewer names than ids": (_group(b"", [1, 2], b"a\0"), "bad-request"),
        "no final nul": (_group(b"", [1], b"a"), "bad-request"),
        "ragged ids": (p.FileGroup(rel=b"", ids=b"\1\0\0", names=b"a\0"), "bad-request"),
        "an id twice": (_group(b"", [7, 7], b"a\0b\0"), "bad-request"),
    }
    async with daemon.session() as s:
        assert p.FEATURE_SEND_DIRS in s.peer.features
        opened = await s.call(p.OpenTree(module="data", path=b"src", direction="pull", operation="copy", compare=0))
        for name, (group, code) in hostile.items():
            with pytest.raises(RemoteError) as info:
                await s.call(p.SendFiles(transfer=opened.transfer, files=[], dirs=[group]))
            assert info.value.code == code, (name, info.value)
        await s.call(p.SendFiles(transfer=opened.transfer, files=[], dirs=[_group(b"", [1], b"a\0")]))
        with pytest.raises(RemoteError) as info:  # an id already queued
            await s.call(p.SendFiles(transfer=opened.transfer, files=[], dirs=[_group(b"", [1], b"b\0")]))
        assert info.value.code == "bad-request"
        plain = await s.call(p.OpenTransfer(module="data", path=b"src", direction="pull", streams=1))
        with pytest.raises(RemoteError) as info:  # not a tree pull: no SourceTree to name files in
            await s.call(p.SendFiles(transfer=plain.transfer, files=[], dirs=[_group(b"", [1], b"a\0")]))
        assert info.value.code == "bad-request"


def _manifest_entries(m: p.DirManifest) -> dict[bytes, tuple[object, ...]]:
    """A manifest's entries by name: (the lstat fields but atime, target, xattrs), packed or
    not. (Reading a symlink's target sets its atime: the second scan sees the first's.)"""
    out = {bytes(e[0]): (tuple(e[1:4] + e[5:12]), e[12], e[13]) for e in m.entries}
    for e in p.unpack_entries(m.packed or b"\0\0\0\0"):
        out[e[0]] = (e[1:4] + e[5:12], None, None)
    return out


@pytest.mark.parametrize("many", [False, True])
def test_the_c_scan_makes_the_manifest_the_python_scan_makes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, many: bool) -> None:
    """The sender's scan in C (scan.scan_packed, R37) against the Python scan as the oracle:
    plain files and directories packed, symlinks, xattr carriers, a fifo and a non-UTF-8 name
    as they were. A directory larger than a manifest part (`many`, parts of 2,000 entries here)
    is scanned in C too since R72 and cut into parts as the Python scan cuts it (8,192 entries
    and up went to the Python scan before)."""
    from blit.ffi import scan as cscan
    from blit.transport.tree import SourceTree

    if not cscan.HAVE_CMPDIR:
        pytest.fail("blit.ffi._scan is not built")
    if many:
        monkeypatch.setattr(p, "PART_ENTRIES", 2000)
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for i in range(9000 if many else 30):
        (d / f"f{i:05d}").write_bytes(b"x" * (i % 7))
    os.symlink("f00001", d / "link")
    os.symlink("/nowhere", d / "dangling")
    os.mkfifo(d / "fifo")
    (d / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    os.setxattr(d / "f00002", "user.tag", b"v1")
    os.setxattr(d / "sub", "user.tag", b"dir")
    calls: list[bool] = []
    real = cscan.scan_packed

    def spy(dfd: int) -> object:
        got = real(dfd)
        calls.append(got is not None)
        return got

    monkeypatch.setattr(cscan, "scan_packed", spy)
    st = SourceTree(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
    try:
        fast_parts = st.scan_parts("d", pack=True)
        monkeypatch.setattr(cscan, "scan_packed", lambda dfd: None)
        slow_parts = st.scan_parts("d", pack=True)
    finally:
        st.close()
    assert calls == [True]
    for parts in (fast_parts, slow_parts):
        assert len(parts) == (5 if many else 1)  # 9,000 + 5 entries in parts of 2,000
        assert [m.more for m in parts] == [True] * (len(parts) - 1) + [False]
        assert all(len(m.entries) + p.packed_count(m.packed or b"\0\0\0\0") <= 2000 for m in parts)
        assert all(not m.failures for m in parts[1:])
    merged = {k: v for m in fast_parts for k, v in _manifest_entries(m).items()}
    assert merged == {k: v for m in slow_parts for k, v in _manifest_entries(m).items()}
    assert sum(map(len, map(_manifest_entries, fast_parts))) == len(merged) == (9005 if many else 35)
    fast, slow = fast_parts[0], slow_parts[0]
    assert all((m.incomplete, m.dir_entry) == (slow.incomplete, slow.dir_entry) for m in fast_parts)
    assert (fast.incomplete, fast.failures, fast.dir_entry) == (slow.incomplete, slow.failures, slow.dir_entry)
    names = {bytes(e[0]) for e in fast.entries}
    assert names == {b"link", b"dangling", b"f00002", b"sub"}  # the rest travels packed
