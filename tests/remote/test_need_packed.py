"""Packed need lists (hello feature need-packed-1, decisions R25): a push's DirPlanned names the
files to send as one NeedGroup. A hostile group is a protocol error on the client, never a
crash; a client without the feature gets Need arrays; both forms land the same tree."""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import pytest
import trio

from blit.errors import RemoteProtocolError
from blit.plan import Compare
from blit.transport import protocol as p
from blit.transport.tree import TopJob, TreeSpec, push_tree

from .conftest import Daemon
from .treeutil import assert_same_tree, checksum_case, make_full_tree, snapshot


def _ids(*ids: int) -> bytes:
    return b"".join(i.to_bytes(4, "little") for i in ids)


HOSTILE = {
    "more names than ids": p.NeedGroup(ids=_ids(1), names=b"a\0b\0"),
    "fewer names than ids": p.NeedGroup(ids=_ids(1, 2), names=b"a\0"),
    "no final nul": p.NeedGroup(ids=_ids(1), names=b"a"),
    "ragged ids": p.NeedGroup(ids=b"\1\0\0", names=b"a\0"),
    "dotdot": p.NeedGroup(ids=_ids(1, 2), names=b"a\0..\0"),
    "dot": p.NeedGroup(ids=_ids(1), names=b".\0"),
    "slash": p.NeedGroup(ids=_ids(1), names=b"../etc/passwd\0"),
    "absolute": p.NeedGroup(ids=_ids(1), names=b"/etc\0"),
    "empty name": p.NeedGroup(ids=_ids(1, 2), names=b"a\0\0"),
    "long name": p.NeedGroup(ids=_ids(1), names=b"x" * 256 + b"\0"),
    "an id twice": p.NeedGroup(ids=_ids(7, 7), names=b"a\0b\0"),
}


@pytest.mark.parametrize("group", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_hostile_need_group_is_a_protocol_error(group: p.NeedGroup) -> None:
    # It travels (a byte string is a byte string) and is refused whole where it is read.
    msg = p.decode(p.DirPlanned, p.encode(p.DirPlanned(subdirs=[], need=[], packed_need=group)))
    with pytest.raises(RemoteProtocolError):
        p.unpack_needs(msg.packed_need)  # type: ignore[arg-type]


def test_a_good_group_reads_back() -> None:
    names = [b"a", b"caf\xe9", b"x" * 255]
    group = p.pack_needs(array("I", [5, 2**32 - 1, 0]), names)
    assert group is not None and p.pack_needs(array("I"), []) is None
    msg = p.decode(p.DirPlanned, p.encode(p.DirPlanned(subdirs=[], need=[], packed_need=group)))
    ids, got = p.unpack_needs(msg.packed_need)  # type: ignore[arg-type]
    assert (list(ids), got) == ([5, 2**32 - 1, 0], names)
    old = p.with_need_list(msg)
    assert old.packed_need is None and [(n.id, n.name) for n in old.need] == list(zip([5, 2**32 - 1, 0], names))


def _tamper(monkeypatch: pytest.MonkeyPatch, make_bad) -> None:  # type: ignore[no-untyped-def]
    """The client reads the first DirPlanned that names files as `make_bad(planned)` makes it."""
    real = p.decode
    done: list[bool] = []

    def decode(cls, body, **kw):  # type: ignore[no-untyped-def]
        msg = real(cls, body, **kw)
        if cls is p.DirPlanned and msg.packed_need is not None and not done:
            done.append(True)
            return make_bad(msg)
        return msg

    monkeypatch.setattr(p, "decode", decode)


def _small_tree(root: Path) -> None:
    root.mkdir()
    for name in ("a", "b", "c"):
        (root / name).write_bytes(name.encode() * 1000)


@pytest.mark.parametrize("name", [*HOSTILE, "an id already asked for"])
async def test_a_hostile_reply_ends_the_push_with_a_protocol_error(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    src = tmp_path / "src"
    _small_tree(src)
    (daemon.modules["data"] / "dst").mkdir()

    def bad(msg: p.DirPlanned) -> p.DirPlanned:
        if name in HOSTILE:
            return p.DirPlanned(subdirs=[], need=[], packed_need=HOSTILE[name])
        ids, names = p.unpack_needs(msg.packed_need)  # type: ignore[arg-type]
        return p.DirPlanned(subdirs=[], need=[p.Need(id=ids[0], name=names[0])], packed_need=msg.packed_need)

    _tamper(monkeypatch, bad)
    async with daemon.session() as s:
        assert p.FEATURE_NEED_PACKED in s.peer.features
        with pytest.raises(RemoteProtocolError, match="packed_need"):
            await push_tree(s, os.fsencode(src), "data", b"dst", TopJob(), TreeSpec())
    # Nothing escaped the module, nothing half-written under a real name.
    assert not os.path.exists(daemon.modules["data"].parent / "etc")
    for f in (daemon.modules["data"] / "dst").iterdir():
        assert f.read_bytes() == (src / f.name).read_bytes()


@pytest.mark.parametrize("feature", [True, False], ids=["need-packed", "older client"])
async def test_both_forms_land_the_same_tree(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, feature: bool) -> None:
    """A full tree, then a --checksum push (needs from tree/hashes too): a client without the
    feature gets Need arrays only, one with it packed groups only; the trees land the same."""
    if not feature:
        def old_hello(self: p.ClientSession) -> p.Hello:
            return p.Hello(protocol=p.PROTOCOL_VERSION, software=self.software, features=[p.FEATURE_DIR_DIGEST, p.FEATURE_PACKED])

        monkeypatch.setattr(p.ClientSession, "hello", old_hello)
    sent: list[tuple[bool, bool]] = []  # (Need arrays, a packed group) per DirPlanned sent
    real_encode = p.encode

    def watch(msg: p.Message) -> bytes:
        if isinstance(msg, p.DirPlanned):
            sent.append((bool(msg.need), msg.packed_need is not None))
        return real_encode(msg)

    monkeypatch.setattr(p, "encode", watch)
    src, dst = tmp_path / "src", daemon.modules["data"] / "dst"
    await trio.to_thread.run_sync(make_full_tree, src)
    dst.mkdir()
    async with daemon.session() as s:
        assert (p.FEATURE_NEED_PACKED in s.peer.features) == feature
        done = await push_tree(s, os.fsencode(src), "data", b"dst", TopJob(), TreeSpec())
    assert not done.failures, done.failures
    await trio.to_thread.run_sync(assert_same_tree, src, dst)
    assert any(sent[i][feature] for i in range(len(sent))), sent
    assert not any(x[not feature] for x in sent), sent

    src2, dst2 = tmp_path / "src2", daemon.modules["data"] / "dst2"
    must_send = await trio.to_thread.run_sync(checksum_case, src2, dst2)
    want = await trio.to_thread.run_sync(snapshot, src2)
    sent.clear()
    async with daemon.session() as s:
        done = await push_tree(s, os.fsencode(src2), "data", b"dst2", TopJob(), TreeSpec(compare=Compare.CHECKSUM))
    assert not done.failures, done.failures
    assert (done.files_copied, done.bytes_copied) == (2, must_send), done
    assert await trio.to_thread.run_sync(snapshot, dst2) == want
    assert not any(x[not feature] for x in sent), sent
