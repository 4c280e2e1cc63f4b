"""Endpoint parsing: one table of texts and what they mean (h11's SIMPLE_CASES style)."""

from __future__ import annotations

import pytest

from blit.endpoint import (
    DEFAULT_PORT,
    HostSpec,
    LocalEndpoint,
    RemoteEndpoint,
    parse_endpoint,
    parse_host,
    parse_listing_target,
)
from blit.errors import ConfigError

D = DEFAULT_PORT

CASES = [
    # local paths
    ("/abs/path", LocalEndpoint("/abs/path")),
    ("/abs/dir/", LocalEndpoint("/abs/dir/")),
    ("rel/path", LocalEndpoint("rel/path")),
    ("file.txt", LocalEndpoint("file.txt")),
    ("./name:x", LocalEndpoint("./name:x")),
    ("../up:down", LocalEndpoint("../up:down")),
    ("dir/a:b", LocalEndpoint("dir/a:b")),
    (".", LocalEndpoint(".")),
    ("..", LocalEndpoint("..")),
    # module endpoints
    ("host:/mod/path", RemoteEndpoint(HostSpec("host", D), "mod", "path")),
    ("host:/mod/path/", RemoteEndpoint(HostSpec("host", D), "mod", "path/")),
    ("host:/mod", RemoteEndpoint(HostSpec("host", D), "mod", "")),
    ("host:/mod/", RemoteEndpoint(HostSpec("host", D), "mod", "")),
    ("nas.local:/photos/2024/jan", RemoteEndpoint(HostSpec("nas.local", D), "photos", "2024/jan")),
    ("host:9000:/mod/a/b", RemoteEndpoint(HostSpec("host", 9000), "mod", "a/b")),
    ("10.0.0.1:/m/x", RemoteEndpoint(HostSpec("10.0.0.1", D), "m", "x")),
    ("10.0.0.1:873:/m/x", RemoteEndpoint(HostSpec("10.0.0.1", 873), "m", "x")),
    ("[::1]:9000:/mod/p", RemoteEndpoint(HostSpec("::1", 9000), "mod", "p")),
    ("[fe80::1%eth0]:9000:/mod/p", RemoteEndpoint(HostSpec("fe80::1%eth0", 9000), "mod", "p")),
    ("[2001:db8::5]:/mod/p/", RemoteEndpoint(HostSpec("2001:db8::5", D), "mod", "p/")),
    ("host:/mod/name with spaces:and:colons", RemoteEndpoint(HostSpec("host", D), "mod", "name with spaces:and:colons")),
    # root export
    ("host://path", RemoteEndpoint(HostSpec("host", D), "", "path")),
    ("host://abs/dir/", RemoteEndpoint(HostSpec("host", D), "", "abs/dir/")),
    ("host://", RemoteEndpoint(HostSpec("host", D), "", "")),
    ("host:9000://srv/x", RemoteEndpoint(HostSpec("host", 9000), "", "srv/x")),
    ("[::1]://srv", RemoteEndpoint(HostSpec("::1", D), "", "srv")),
    # a user to authenticate as (--secrets-file)
    ("alice@nas:/photos/x", RemoteEndpoint(HostSpec("nas", D), "photos", "x", "alice")),
    ("al.ice_2@nas:9000:/m/", RemoteEndpoint(HostSpec("nas", 9000), "m", "", "al.ice_2")),
    ("alice@[::1]:9000:/mod/p", RemoteEndpoint(HostSpec("::1", 9000), "mod", "p", "alice")),
    ("alice@[2001:db8::5]:/mod", RemoteEndpoint(HostSpec("2001:db8::5", D), "mod", "", "alice")),
    ("bob@host://srv/x", RemoteEndpoint(HostSpec("host", D), "", "srv/x", "bob")),
    ("a@b", LocalEndpoint("a@b")),
    ("./alice@nas:/x", LocalEndpoint("./alice@nas:/x")),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_parse_endpoint(text: str, expected: object) -> None:
    assert parse_endpoint(text) == expected


BAD = [
    ("", "empty"),
    ("host:", "must start with '/'"),
    ("file:name.txt", "./file:name.txt"),
    ("host:/", "no module"),
    ("host:9000", "after the port"),
    ("host:70000:/m/p", "out of range"),
    ("host:0:/m/p", "out of range"),
    ("[::1:/m/p", "missing ']'"),
    ("[not-v6]:/m/p", "not an IPv6 address"),
    ("[::1]9000:/m/p", "expected ':'"),
    ("[::1]:9000/m/p", "after the port"),
    ("ho st:/m/p", "not a valid host name"),
    ("-host:/m/p", "not a valid host name"),
    ("host:/m/../etc", "'..'"),
    ("host://../etc", "'..'"),
    ("host:/bad$mod/x", "not a valid module name"),
    ("a\0b", "NUL"),
    ("host:/m/" + "a" * 256 + "/x", "a name in the path is longer than 255 bytes"),
    ("host://" + "\u00e9" * 128, "a name in the path is longer than 255 bytes"),  # 256 bytes of UTF-8
]


@pytest.mark.parametrize(("text", "problem"), BAD, ids=[repr(b[0])[:40] for b in BAD])
def test_malformed_endpoints_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_endpoint(text)
    assert problem in str(info.value)


def test_trailing_slash_is_kept() -> None:
    assert parse_endpoint("src/").trailing_slash
    assert not parse_endpoint("src").trailing_slash
    ep = parse_endpoint("h:/m/dir/")
    assert isinstance(ep, RemoteEndpoint) and ep.trailing_slash and ep.path == "dir/"


def test_remote_endpoint_round_trips_through_str() -> None:
    for text in ["h:/m/a/b", "h:9000:/m/a/", "[::1]:9000:/m/x", "h://srv/x"]:
        assert str(parse_endpoint(text)) == text


def test_path_bytes_undo_surrogate_escapes() -> None:
    ep = parse_endpoint("h:/m/caf\udce9")
    assert isinstance(ep, RemoteEndpoint)
    assert ep.path_bytes == b"caf\xe9"


HOSTS = [
    ("host", HostSpec("host", D)),
    ("host:9000", HostSpec("host", 9000)),
    ("127.0.0.1", HostSpec("127.0.0.1", D)),
    ("[::1]", HostSpec("::1", D)),
    ("[::1]:9000", HostSpec("::1", 9000)),
    ("::1", HostSpec("::1", D)),
    ("fe80::1", HostSpec("fe80::1", D)),
]


@pytest.mark.parametrize(("text", "expected"), HOSTS, ids=[h[0] for h in HOSTS])
def test_parse_host(text: str, expected: HostSpec) -> None:
    assert parse_host(text) == expected


@pytest.mark.parametrize("text", ["", "host:x", "host:99999", "[::1", "[::1]x", "bad host"])
def test_parse_host_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_host(text)


def test_listing_target_is_host_or_endpoint() -> None:
    assert parse_listing_target("nas") == HostSpec("nas", D)
    assert parse_listing_target("nas:9000") == HostSpec("nas", 9000)
    assert parse_listing_target("nas:/") == HostSpec("nas", D)
    assert parse_listing_target("nas:/m/x") == RemoteEndpoint(HostSpec("nas", D), "m", "x")
    with pytest.raises(ConfigError, match="local path"):
        parse_listing_target("/tmp/x")


def test_hostspec_netloc() -> None:
    assert HostSpec("h").netloc == f"h:{D}"
    assert HostSpec("::1", 5).netloc == "[::1]:5"
    assert str(HostSpec("h")) == "h"
