"""The sans-IO protocol: codec round trips, validation, limits, the session table, data frames.
No sockets, no event loop."""

from __future__ import annotations

import re
from pathlib import Path

import cbor2
import pytest

from blit.errors import IncompatiblePeerError, LocalProtocolError, RemoteError, RemoteProtocolError
from blit.transport import protocol as p

ROOT = Path(__file__).resolve().parents[2]

SAMPLES: list[p.Message] = [
    p.Hello(protocol=1, software="blit test", features=["x"]),
    p.HelloReply(protocol=1, software="blitd", name="box", data_port=9032, max_message=p.MAX_MESSAGE),
    p.HelloReply(protocol=1, software="blitd", name="box", data_port=None, max_message=1),
    p.AuthChallenge(),
    p.AuthNonce(nonce=bytes(range(32))),
    p.Auth(module="m", user="alice", mac=bytes(32)),
    p.ListModules(),
    p.ModuleList(modules=[p.ModuleInfo(name="m", comment="c", read_only=True)], root=False, root_read_only=False),
    p.ListDir(module="m", path=b"a/\xff\n b", after=b"x", limit=5),
    p.DirListing(
        entries=[
            p.Entry(name=b"\xff\xfe", kind="file", size=1, mtime_ns=-5, mode=0o100644),
            p.Entry(name=b"l", kind="symlink", size=0, mtime_ns=1, mode=0o120777, target=b"/etc"),
        ],
        more=True,
    ),
    p.Stat(module="", path=b""),
    p.StatReply(entry=None),
    p.OpenTransfer(module="m", path=b"d", direction="pull", streams=4, h2_data=True),
    p.TransferOpened(transfer=7, data_port=None, tokens=[b"t" * 32], expires_ms=30000),
    p.SendFiles(transfer=7, files=[p.FileRef(id=1, path=b"a")], last=True),
    p.ExpectFiles(transfer=7, files=[p.FileOffer(id=1, path=b"a", size=3, mtime_ns=4, mode=0o644)]),
    p.FinishTransfer(transfer=7),
    p.TransferDone(files=1, nbytes=2, failures=[p.FileFailure(id=3, message="gone")]),
    p.Error(error="bad-request", message="no"),
    p.Ack(),
    p.OpenTree(module="m", path=b"", direction="push", operation="mirror", compare=1, filters=[p.FilterRule(include=False, pattern="*.o")]),
    p.TreeDir(
        transfer=1,
        rel=b"a",
        dst_rel=b"b",
        dst_new=True,
        only=[p.Rename(name=b"x", dname=b"y")],
        entries=[
            p.SrcEntry(name=b"\xff", mode=0o100644, size=3, mtime_ns=1, atime_ns=2, uid=0, gid=0, dev=5, ino=6, nlink=2, rdev=0, blocks=8,
                       xattrs=[p.XAttr(name="user.a", value=b"v")]),
        ],
    ),
    p.DirPlanned(subdirs=[p.SubDir(name=b"d", dname=b"d", new=True)], need=[p.Need(id=3, name=b"f")], failures=[p.PathFailure(path=b"p", op="copy", message="m")]),
    p.TreeScan(transfer=1, rel=b""),
    p.DirManifest(entries=[], incomplete=False),
    p.TreeScans(transfer=1, rels=[b"", b"a"]),
    p.DirManifests(manifests=[p.DirManifest(entries=[], incomplete=False, more=True)]),
    p.TreeDirs(transfer=1, dirs=[p.TreeDir(transfer=1, rel=b"a", dst_rel=b"a", dst_new=True, entries=[])]),
    p.DirsPlanned(planned=[p.DirPlanned(subdirs=[], need=[])]),
    p.TreeFinish(transfer=1, source_complete=False),
    p.TreeDone(files_copied=1, bytes_copied=2, files_skipped=3, dirs_created=4, links_created=5, files_deleted=6, entries_seen=7, failures=[], deletions_skipped="why"),
    p.DirPlanned(subdirs=[], need=[], hash=[b"same-size"], settled=4),
    p.DirPlanned(subdirs=[], need=[], packed_need=p.NeedGroup(ids=(7).to_bytes(4, "little"), names=b"f\0")),
    p.TreeHashes(transfer=1, rel=b"a", hashes=[p.FileHash(name=b"f", digest=b"\x01" * 16), p.FileHash(name=b"g", digest=None)]),
    p.TreeHash(transfer=1, rel=b"", names=[b"f"]),
    p.TreeDigests(transfer=1, dirs=[p.DirDigest(rel=b"a", dst_rel=b"b", digest=b"\x03" * 16, subdirs=[
        p.SrcEntry(name=b"s", mode=0o40755, size=0, mtime_ns=1, atime_ns=2, uid=0, gid=0, dev=5, ino=6, nlink=2, rdev=0, blocks=0)])]),
    p.DigestsChecked(equal=[True, False], settled=500),
    p.TreeHave(transfer=1, flags=1, dirs=[p.DirHave(rel=b"a/b", digest=b"\x04" * 16)]),
    p.HaveChecked(dirs=[p.SameDir(equal=False, subdirs=[]), p.SameDir(equal=True, subdirs=[
        p.SrcEntry(name=b"s", mode=0o40755, size=0, mtime_ns=1, atime_ns=2, uid=0, gid=0, dev=5, ino=6, nlink=2, rdev=0, blocks=0)])]),
    p.HashList(hashes=[p.FileHash(name=b"f", digest=b"\x02" * 16)], failures=[p.PathFailure(path=b"g", op="checksum", message="Permission denied")]),
    p.TreeLanded(transfer=1),
    p.LandedPage(groups=[p.RemoveGroup(rel=b"a", files=[p.Landed(name=b"\xff", size=3, mtime_ns=-1)], dirs=[]), p.RemoveGroup(rel=b"", files=[], dirs=[b"a"])], more=False),
    p.LandedPage(groups=[p.RemoveGroup(rel=b"a", files=[p.Landed(name=b"f", size=3, mtime_ns=-1, ino=(1 << 64) - 1)], dirs=[])], more=True),
    p.TreeRemove(transfer=1, groups=[], last=True),
    p.TreeRemoved(removed=3, failures=[]),
    p.PeerPull(module="n", path=b"y/", peer=p.Peer(host="::1", port=9031, module="m", path=b"x", tls=False), operation="mirror", compare=0,
               filters=[p.FilterRule(include=True, pattern="*.c")], dry_run=True, streams=3, h2_data=True),
    p.PeerStarted(job=4),
    p.PeerWait(job=4, wait_ms=250),
    p.PeerStatus(done=False, files_copied=1, bytes_copied=2, entries_seen=3),
    p.PeerStatus(done=True, files_copied=1, bytes_copied=2, entries_seen=3, carrier="tcp",
                 result=p.TreeDone(files_copied=1, bytes_copied=2, files_skipped=0, dirs_created=0, links_created=0, files_deleted=0, entries_seen=3,
                                   failures=[p.PathFailure(path=b"a", op="copy", message="gone")])),
    p.PeerStatus(done=True, files_copied=0, bytes_copied=0, entries_seen=0, error=p.Error(error="peer-failed", message="Connection refused")),
    p.OpenTree(module="m", path=b"x", direction="push", operation="copy", compare=0, dry_run=True, report_actions=True),
    p.TreeActions(transfer=1),
    p.ActionPage(actions=[p.Action(action="copy", path=b"a/\xff"), p.Action(action="delete", path=b"b")], more=True),
    p.ActionPage(actions=[], more=False, dropped=3),
    p.PeerPull(module="n", path=b"y", peer=p.Peer(host="h", port=1, module="m", path=b"x"), operation="copy", compare=0, report_actions=True),
    p.PeerStatus(done=False, files_copied=1, bytes_copied=2, entries_seen=3, actions=[p.Action(action="mkdir", path=b"d")]),
    p.PeerStatus(done=True, files_copied=1, bytes_copied=2, entries_seen=3, actions_dropped=2,
                 result=p.TreeDone(files_copied=1, bytes_copied=2, files_skipped=0, dirs_created=0, links_created=0, files_deleted=0, entries_seen=3, failures=[])),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_messages_round_trip(msg: p.Message) -> None:
    wire = p.encode(msg)
    back = p.decode(type(msg), wire)
    assert p.encode(back) == wire
    if "=[SrcEntry" not in repr(msg):  # RAW entries come back as their arrays
        assert back == msg


def test_raw_entries_decode_to_meta_ordered_arrays() -> None:
    e = p.SrcEntry(name=b"n", mode=1, size=2, mtime_ns=3, atime_ns=4, uid=5, gid=6, ino=7, dev=8, nlink=9, rdev=10, blocks=11)
    back = p.decode(p.DirManifest, p.encode(p.DirManifest(entries=[e], incomplete=False)))
    (raw,) = back.entries
    from blit.fsops import Meta

    m = Meta._make(raw[1:12])
    assert (m.st_mode, m.st_ino, m.st_dev, m.st_blocks) == (1, 7, 8, 11)


def test_array_messages_are_compact_arrays() -> None:
    wire = cbor2.loads(p.encode(p.DirListing(entries=[p.Entry(name=b"a", kind="dir", size=0, mtime_ns=0, mode=0)], more=False)))
    assert wire["entries"] == [[b"a", "dir", 0, 0, 0]]


@pytest.mark.parametrize(
    ("cls", "obj", "problem"),
    [
        (p.Hello, {"protocol": True, "software": "x"}, "expected an integer"),
        (p.Hello, {"protocol": 1}, "missing field 'software'"),
        (p.Hello, {"protocol": 1, "software": "x", "extra": 1}, "unknown field"),
        (p.Hello, [1, "x"], "expected a map"),
        (p.Hello, {"protocol": -1, "software": "x"}, "out of range"),
        (p.Hello, {"protocol": 1, "software": "x" * 129}, "longer than"),
        (p.ListDir, {"module": "m", "path": "text"}, "expected a byte string"),
        (p.ListDir, {"module": "m", "path": b"x" * 70000}, "longer than 65536"),
        (p.OpenTransfer, {"module": "m", "path": b"", "direction": "push", "streams": 99}, "out of range"),
        (p.DirListing, {"entries": [[b"a", "file"]], "more": False}, "expected 5 to 6 items"),
        (p.SendFiles, {"transfer": 1, "files": [[1, b"a"]] * (p.MAX_LIST + 1)}, "more than"),
        (p.StatReply, {"entry": "x"}, "expected an array"),
    ],
)
def test_invalid_messages_are_refused_with_the_field(cls: type[p.Message], obj: object, problem: str) -> None:
    with pytest.raises(RemoteProtocolError, match=re.escape(problem)):
        p.decode(cls, cbor2.dumps(obj))


@pytest.mark.parametrize(
    "body",
    [b"", b"\xff", b"\x9f\x9f\x9f", b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", cbor2.dumps([[[[[[[[[[[1]]]]]]]]]]])],
    ids=["empty", "break", "indefinite-unterminated", "huge-length", "too-deep"],
)
def test_malformed_cbor_is_a_remote_protocol_error(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        p.decode(p.Hello, body)
    assert info.value.code == 400


def test_duplicate_keys_and_tags_are_refused() -> None:
    dup = b"\xa2" + cbor2.dumps("protocol") + b"\x01" + cbor2.dumps("protocol") + b"\x01"
    with pytest.raises(RemoteProtocolError):
        p.decode(p.Hello, dup)
    tagged = cbor2.dumps({"protocol": cbor2.CBORTag(1, 5), "software": "x"})
    with pytest.raises(RemoteProtocolError):
        p.decode(p.Hello, tagged)


def test_oversized_body_is_413() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        p.decode(p.Hello, b"\0" * (p.MAX_MESSAGE + 1))
    assert info.value.code == 413


def test_encoding_an_invalid_message_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        p.encode(p.Hello(protocol=1, software="x" * 1000))


# --- paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "parts"),
    [(b"", []), (b"a", [b"a"]), (b"a//b/./c/", [b"a", b"b", b"c"]), (b"\xff\n x", [b"\xff\n x"]), (b"...", [b"..."])],
)
def test_split_path(path: bytes, parts: list[bytes]) -> None:
    assert p.split_path(path) == parts


@pytest.mark.parametrize(("path", "why"), [(b"/etc", "absolute"), (b"a/../b", "'..'"), (b"..", "'..'"), (b"a\0b", "NUL"), (b"x" * 256, "longer")])
def test_split_path_refuses_escapes(path: bytes, why: str) -> None:
    with pytest.raises(p.Refused) as info:
        p.split_path(path)
    assert info.value.code is p.ErrorCode.PATH_REFUSED and why in info.value.message


# --- sessions ----------------------------------------------------------------------------------


def hello(version: int = p.PROTOCOL_VERSION) -> bytes:
    return p.encode(p.Hello(protocol=version, software="blit peer"))


def test_session_requires_hello_first() -> None:
    s = p.ServerSession(software="blitd")
    with pytest.raises(p.Refused) as info:
        s.receive_request("/blit/modules", p.encode(p.ListModules()))
    assert info.value.code is p.ErrorCode.NO_SESSION
    assert isinstance(s.receive_request("/blit/hello", hello()), p.Hello)
    assert s.state is p.SessionState.READY
    assert isinstance(s.receive_request("/blit/modules", p.encode(p.ListModules())), p.ListModules)
    with pytest.raises(p.Refused):
        s.receive_request("/blit/hello", hello())


def test_every_state_and_operation_pair_is_decided_by_the_table() -> None:
    for state, allowed in p.SESSION_TRANSITIONS.items():
        for name, op in p.OPERATIONS.items():
            s = p.ServerSession(software="d")
            s.state = state
            body = hello() if name == "hello" else p.encode(next(m for m in SAMPLES if type(m) is op.request))
            if name in allowed:
                s.receive_request("/blit/" + name, body)
                assert s.state is allowed[name]
            else:
                with pytest.raises(p.Refused):
                    s.receive_request("/blit/" + name, body)


def test_version_mismatch_names_both_versions() -> None:
    s = p.ServerSession(software="blitd 0.1")
    with pytest.raises(p.Refused) as info:
        s.receive_request("/blit/hello", hello(2))
    assert info.value.code is p.ErrorCode.VERSION
    assert "speaks blit protocol 1" in info.value.message and "speaks 2" in info.value.message
    assert s.state is p.SessionState.AWAIT_HELLO


def test_client_refuses_a_daemon_of_another_version() -> None:
    c = p.ClientSession(software="blit")
    reply = p.encode(p.HelloReply(protocol=9, software="blitd 9", name="x", data_port=None, max_message=1))
    with pytest.raises(IncompatiblePeerError, match="speaks blit protocol 1.*speaks 9"):
        c.reply(p.Hello, 200, reply)


def test_client_turns_errors_into_remote_errors() -> None:
    c = p.ClientSession(software="blit")
    with pytest.raises(RemoteError) as info:
        c.reply(p.ListModules, 404, p.error_body(p.ErrorCode.UNKNOWN_MODULE, "unknown module 'x'"))
    assert info.value.code == "unknown-module"
    with pytest.raises(IncompatiblePeerError):
        c.reply(p.Hello, 426, p.error_body(p.ErrorCode.VERSION, "v"))


def test_unknown_paths_and_operations() -> None:
    s = p.ServerSession(software="d")
    for path in ["/other", "/blit/nope", "/blit/"]:
        with pytest.raises(p.Refused) as info:
            s.receive_request(path, b"")
        assert info.value.code is p.ErrorCode.UNKNOWN_OP


# --- data frames ---------------------------------------------------------------------------------


def test_data_hello_round_trip_and_refusals() -> None:
    tok = bytes(range(32))
    assert p.unpack_data_hello(p.pack_data_hello(tok)) == (tok, False)
    # Sealed (R67): the hello names the token's id; its secret never crosses the data port.
    assert p.unpack_data_hello(p.pack_data_hello(tok, sealed=True)) == (tok[: p.TOKEN_ID_BYTES] + bytes(p.TOKEN_SECRET_BYTES), True)
    with pytest.raises(p.Refused, match="unknown data hello flags"):
        p.unpack_data_hello(p.DATA_HELLO.pack(p.DATA_MAGIC, p.PROTOCOL_VERSION, 6, tok))
    with pytest.raises(p.Refused, match="not a blit data stream"):
        p.unpack_data_hello(b"GET / HTTP/1.1\r\n" + b"\0" * 28)
    other = p.DATA_HELLO.pack(p.DATA_MAGIC, 7, 0, tok)
    with pytest.raises(p.Refused, match="speaks 1.*speaks 7"):
        p.unpack_data_hello(other)


def test_frame_parser_handles_any_chunking() -> None:
    stream = (
        p.pack_frame(p.FrameType.DATA, 1, 10, 6) + b"abcdef"
        + p.pack_frame(p.FrameType.NOOP)
        + p.pack_frame(p.FrameType.ABORT, 2, 0, 4) + b"gone"
        + p.pack_frame(p.FrameType.END, 1, 16)
        + p.pack_frame(p.FrameType.DONE)
    )
    for step in (1, 5, 24, 1000):
        parser = p.FrameParser()
        events = []
        for i in range(0, len(stream), step):
            events += parser.feed(stream[i : i + step])
        assert parser.idle
        data = b"".join(e.data for e in events if isinstance(e, p.FramePayload))
        assert data == b"abcdef"
        offsets = [e.offset for e in events if isinstance(e, p.FramePayload)]
        assert offsets[0] == 10
        done = [e for e in events if isinstance(e, p.FrameComplete)]
        assert [e.header.type for e in done] == [p.FrameType.DATA, p.FrameType.NOOP, p.FrameType.ABORT, p.FrameType.END, p.FrameType.DONE]
        assert done[2].data == b"gone"


@pytest.mark.parametrize(
    "raw",
    [
        p.FRAME.pack(99, 0, 0, 0, 0, 0),
        p.FRAME.pack(p.FrameType.DONE, 0, 0, 0, 0, 5),
        p.FRAME.pack(p.FrameType.END, 0, 0, 1, 0, 3),
        p.FRAME.pack(p.FrameType.ABORT, 0, 0, 1, 0, 1 << 20),
        p.FRAME.pack(p.FrameType.DATA, 0, 0, 1, 1 << 63, 1),
    ],
)
def test_bad_frames_are_refused(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        p.unpack_frame(raw)


def test_protocol_module_imports_no_io() -> None:
    import ast

    src = (ROOT / "src/blit/transport/protocol.py").read_text()
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"trio", "h2", "socket", "ssl", "select", "httpx", "httpx2"}


def test_schema_names_every_message() -> None:
    cddl = (ROOT / "schemas/control.cddl").read_text()
    for op in p.OPERATIONS.values():
        for cls in (op.request, op.reply):
            assert re.search(rf"^{cls.__name__}\s*=", cddl, re.M), cls.__name__
        assert f'"{op.name}"' in cddl
    assert f"protocol-version = {p.PROTOCOL_VERSION}" in cddl


def test_auth_mac_binds_the_nonce_user_and_module() -> None:
    import hashlib
    import hmac

    nonce = bytes(range(32))
    mac = p.auth_mac(b"secret", nonce, "alice", "m")
    want = hmac.new(b"secret", b"blit-auth-1\x00\x20" + nonce + b"\x00\x05alice\x00\x01m", hashlib.sha256).digest()
    assert mac == want and len(mac) == p.AUTH_MAC_BYTES
    others = {
        p.auth_mac(b"secret", bytes(32), "alice", "m"),
        p.auth_mac(b"secret", nonce, "alicem", ""),
        p.auth_mac(b"secret", nonce, "alice", "n"),
        p.auth_mac(b"secreT", nonce, "alice", "m"),
    }
    assert mac not in others and len(others) == 4


def test_fields_added_for_actions_stay_off_the_wire_unless_used() -> None:
    """report_actions (OpenTree, PeerPull) and the actions of PeerStatus are sent only when set:
    a daemon or client that predates them (and refuses unknown fields) sees exactly the maps it
    knows from a plain run."""
    tree = cbor2.loads(p.encode(p.OpenTree(module="m", path=b"", direction="push", operation="copy", compare=0)))
    assert set(tree) == {"module", "path", "direction", "operation", "compare", "filters", "dry_run", "streams", "h2_data", "create_base"}
    peer = cbor2.loads(p.encode(p.PeerPull(module="n", path=b"", peer=p.Peer(host="h", port=1, module="m", path=b""), operation="copy", compare=0)))
    assert "report_actions" not in peer
    status = cbor2.loads(p.encode(p.PeerStatus(done=True, files_copied=0, bytes_copied=0, entries_seen=0)))
    assert set(status) == {"done", "files_copied", "bytes_copied", "entries_seen"}  # fields left at None never travel
    asked = cbor2.loads(p.encode(p.OpenTree(module="m", path=b"", direction="push", operation="copy", compare=0, report_actions=True)))
    assert asked["report_actions"] is True
    assert p.FEATURE_ACTIONS in p.ClientSession(software="t").hello().features


def test_messages_are_frozen_keyword_only_values() -> None:
    """What @dataclass(frozen=True, kw_only=True, slots=True) gave, from message_class: equality
    and hashing by value and type, a readable repr, no assignment, a fresh default list per
    message, dataclasses.replace."""
    import dataclasses

    a = p.Hello(protocol=1, software="x")
    b = p.Hello(protocol=1, software="x")
    assert a == b and hash(p.Ack()) == hash(p.Ack()) and a != p.Hello(protocol=2, software="x")
    assert p.Stat(module="m", path=b"") != p.Stat(module="m", path=b"x") and p.AuthChallenge() != p.ListModules()
    assert repr(a) == "Hello(protocol=1, software='x', features=[])"
    assert a.features is not b.features
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.protocol = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        a.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        p.Hello(1, "x")  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.Hello(protocol=1)  # type: ignore[call-arg]
    assert dataclasses.replace(a, protocol=3) == p.Hello(protocol=3, software="x")
    assert [f.name for f in dataclasses.fields(p.Hello)] == ["protocol", "software", "features"]


def test_a_body_with_too_many_maps_and_arrays_is_refused_before_decoding() -> None:
    """MAX_CONTAINERS bounds what a body may make the decoder allocate (~60 bytes per map or
    array, from one byte each); a real manifest part of PART_ENTRIES entries, each with two
    xattrs, stays well inside it and decodes."""
    from blit.ffi import scan

    if not scan.HAVE_CMPDIR:
        pytest.skip("the C module was not built: bodies are not counted")
    n = p.MAX_CONTAINERS + 1
    bomb = b"\x9a" + n.to_bytes(4, "big") + b"\x80" * n  # an array of empty arrays
    with pytest.raises(RemoteProtocolError, match="more than 1048576 maps, arrays and tags") as info:
        p.decode(p.DirManifest, bomb)
    assert info.value.code == 413
    xa = [p.XAttr(name="user.a", value=b"1"), p.XAttr(name="user.b", value=b"")]
    entries = [
        p.SrcEntry(name=b"f%d" % i, mode=0o100644, size=1, mtime_ns=1, atime_ns=1, uid=0, gid=0, ino=i, dev=1, nlink=1, rdev=0, blocks=8, xattrs=xa)
        for i in range(p.PART_ENTRIES)
    ]
    wire = p.encode(p.DirManifest(entries=entries, incomplete=False))
    assert len(wire) > 1 << 20

    def containers(obj: object) -> int:  # the oracle: the decoded object's maps and arrays
        if isinstance(obj, dict):
            return 1 + sum(containers(k) + containers(v) for k, v in obj.items())
        if isinstance(obj, list):
            return 1 + sum(containers(x) for x in obj)
        return 0

    count = scan.cbor_containers(wire, p.MAX_CONTAINERS)
    assert count == containers(cbor2.loads(wire)) and count > 4 * p.PART_ENTRIES
    assert len(p.decode(p.DirManifest, wire).entries) == p.PART_ENTRIES


@pytest.mark.parametrize(
    ("body", "count"),
    [
        (cbor2.dumps({"a": [1, {"b": b"x" * 300}], "c": cbor2.CBORTag(2, b"\x01")}), 4),
        (bytes([0x9F, 0x01, 0xA0, 0xFF]), 2),  # indefinite array holding a map
        (bytes([0x5F, 0x41, 0x61, 0xFF]), 0),  # indefinite byte string: no container
        (bytes([0x9F, 0x01]), -2),  # unterminated: the decoder says why
        (bytes([0x82, 0x01]), -2),  # an array shorter than its count
        (bytes([0x9A, 0xFF, 0xFF, 0xFF, 0xFF]), -2),  # a count longer than the body
        (b"\xff", -2),
        (b"\x1c", -2),  # a reserved argument encoding
    ],
)
def test_the_container_count_walks_cbor_without_decoding_it(body: bytes, count: int) -> None:
    from blit.ffi import scan

    if not scan.HAVE_CMPDIR:
        pytest.skip("the C module was not built")
    assert scan.cbor_containers(body, 100) == count
