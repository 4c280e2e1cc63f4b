"""--exclude / --include against rsync as the oracle (`rsync -aHXS --numeric-ids`, `--delete` for
mirror, the same rules in the same order), locally and through a real `blit daemon` on
127.0.0.1 (the destination side plans with the rules, docs/protocol.md §4: the daemon for a
push, the client for a pull). Trees are compared entry by entry: names, kinds, bytes, modes,
owners, mtimes, xattrs (differential.run_case).

A hand-made tree holds a name for every rule feature (docs/cli.md, Filters): patterns with and
without `/`, anchored `/x` (relative to the transfer root: `src/` and `src` differ), trailing
`dir/`, `*`, `**` (also `**/x` at the root and `dir/***`), `?` (one byte), classes (`]` first,
negated, ranges, `[:digit:]`), `\\` escapes, first match wins, an excluded directory not
descended (an include of a file inside it copies nothing), and destination-only entries that
the rules exclude (mirror keeps them, as rsync without --delete-excluded). Seeded random trees
(randtree.py) add odd names (bytes that are not UTF-8, blanks, glob characters) and every kind
of entry, onto a stale destination.

Where blit deliberately differs from rsync, the documented behaviour is asserted instead: a
pattern rsync silently never matches (an unclosed `[`) is refused before anything is done.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blit.errors import RemoteError
from blit.transport import protocol as p
from helpers import Symlink, make_tree, rmtree, snapshot

from .conftest import Daemon, run_daemon_process
from .differential import Sides, _blit, _ep, _rsync, run_case
from .randtree import diverge_dest, make_random_tree


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sides]:
    tmp = tmp_path_factory.mktemp("filters")
    try:
        with run_daemon_process(tmp / "A") as a:
            (tmp / "work").mkdir()
            yield Sides(a, None, tmp / "work")
    finally:
        rmtree(tmp)


SOURCE = {
    "a.o": "object\n",
    "keep.o": "kept object\n",
    "a.c": "c source\n",
    "B.C": "upper-case C source\n",
    "lib.a": "archive\n",
    "1.txt": "one\n",
    "12.txt": "twelve\n",
    "build/": {"out.bin": "built\n", "sub/": {"more.bin": "more\n"}},
    "sub/": {
        "build": "a FILE named build\n",
        "x/": {"n.txt": "nested x\n"},
        "x.txt": "x.txt\n",
        "b.o": "b object\n",
        "keep.o": "nested kept object\n",
        "sub/": {"note.txt": "sub/sub/note\n"},
    },
    "x/": {"in.txt": "top x\n", "keep.me": "inside an excluded directory\n"},
    "foo/": {"f": "top-level foo\n"},
    "deep/": {"foo/": {"g": "deep foo\n"}, "foo.c": "foo.c\n", "a/": {"b/": {"z.txt": "z\n", "z.log": "log\n"}},
              "cache/": {"c": "deep cache\n"}},
    "cache/": {"big.bin": "cached\n", "keep/": {"k": "k\n"}},
    "]x": "bracket first\n",
    "a]": "bracket last\n",
    b"caf\xe9": "latin-1 name: 4 bytes\n",
    "café": "UTF-8 name: 5 bytes\n",
    "back\\slash": "a backslash in the name\n",
    "Digit9": "digit last\n",
    "9lives": "digit first\n",
    "star*": "a literal star\n",
    "starry": "a name the star would match\n",
    "src/": {"x/": {"f": "inner src/x\n"}, "y.txt": "inner src/y.txt\n"},
    "lnk": Symlink("foo"),
    "swap": "a file where the destination has a directory\n",
}  # fmt: skip

DEST = {
    "stale.o": "destination only, *.o\n",
    "stale.txt": "destination only\n",
    "3.txt": "destination only, ?.txt\n",
    "Digit0": "destination only, digit last\n",
    "build/": {"old.bin": "old build output\n"},
    "x/": {"extra": "extra\n", "keep.me": "stale\n"},
    "sub/": {"old.o": "old\n", "extra.txt": "extra\n", "x/": {"old": "old\n"},
             "build/": {"old.bin": "a directory where the source has a file\n"}},
    "only_dst/": {"f.txt": "f\n", "g.o": "g\n", "foo/": {"h": "h\n"}, "cache/": {"c": "c\n"}},
    "cache/": {"old": "old cache\n"},
    "foo/": {"old": "old foo\n"},
    "deep/": {"foo/": {"old": "old\n"}, "a/": {"b/": {"old.log": "old log\n"}}},
    "src/": {"x/": {"old": "old inner src/x\n"}, "old.txt": "old\n"},
    "a]": "stale bracket last, other size\n",
    "swap/": {"kept.o": "excluded by some rules\n", "gone.txt": "not excluded\n", "1.txt": "?.txt\n"},
}  # fmt: skip


def _hand_tree(root: Path, is_dst: bool) -> None:
    make_tree(root, DEST if is_dst else SOURCE)


RULES = {
    # first match wins, `*`, dir-only, anchored, `**` inside, `?`
    "objects": ("--include", "keep.o", "--exclude", "*.o", "--exclude", "build/", "--exclude", "/x",
                "--exclude", "deep/**/z.*", "--exclude", "?.txt"),
    # `**/x` at the root too, `dir/***` (the directory and what is in it), classes, `?` is a
    # byte (caf\xe9 only), a literal backslash (no wildcard: no escapes), an escaped `*`
    "wild": ("--exclude", "**/foo", "--exclude", "cache/***", "--exclude", "*[[:digit:]]",
             "--exclude", "[]]*", "--exclude", "*[]]", "--exclude", "caf?", "--exclude", "back\\slash",
             "--exclude", "star\\*"),
    # only some files, every directory: destination extras outside them are kept
    "only": ("--include", "*/", "--include", "*.txt", "--include", "*.[cC]", "--exclude", "*"),
    # anchoring follows the transfer root (`src/`: the inner src/x; `src`: the top x); an
    # include of a file in an excluded directory copies nothing (not descended); negated class
    "dirs": ("--exclude", "/src/x", "--include", "x/keep.me", "--exclude", "x/", "--exclude", "sub/*/",
             "--exclude", "[!a-z]*"),
}  # fmt: skip

CASES = [
    # (direction, op, form, rules): each rule list locally and through the daemon both ways,
    # each source form with each direction.
    ("local", "mirror", "/", "objects"),
    ("local", "mirror", "", "wild"),
    ("local", "mirror", "/", "only"),
    ("local", "mirror", "/", "dirs"),
    ("local", "mirror", "", "dirs"),
    ("local", "copy", "", "objects"),
    ("push", "mirror", "", "objects"),
    ("push", "mirror", "/", "wild"),
    ("push", "mirror", "/", "dirs"),
    ("pull", "mirror", "/", "objects"),
    ("pull", "mirror", "", "only"),
    ("pull", "mirror", "", "dirs"),
]


@pytest.mark.parametrize(("direction", "op", "form", "rules"), CASES,
                         ids=[f"{d}-{o}-src{f or '_'}-{r}" for d, o, f, r in CASES])  # fmt: skip
def test_filters_land_what_rsync_lands(sides: Sides, direction: str, op: str, form: str, rules: str) -> None:
    diffs = run_case(sides, direction, _hand_tree, op, flags=RULES[rules], form=form)
    assert not diffs, "\n".join(diffs)


def _random(seed: int) -> Callable[[Path, bool], None]:
    """A random tree as the source; its stale copy (diverge_dest) as the destination."""
    made: list[Path] = []

    def build(root: Path, is_dst: bool) -> None:
        if not is_dst:
            make_random_tree(root, seed, max_entries=80)
            made[:] = [root]
            return
        _rsync(f"{made[0]}/", root)
        diverge_dest(root, seed)

    return build


RANDOM_RULES = (
    "--include", "e0[0-4]?", "--exclude", "e0*", "--exclude", "*[[:space:]]*", "--exclude", "caf?*",
    "--exclude", "glob\\*\\?\\[x]*", "--exclude", "**/.hidden*/", "--include", "*/", "--exclude", "*[!0-9]",
)  # fmt: skip
"""randtree's names: e001, e002, ... and a pool of odd ones (bytes that are not UTF-8, blanks,
glob characters, a backslash), some with a number after them."""


@pytest.mark.parametrize(("seed", "direction", "form"), [(1, "pull", "/"), (2, "push", "")])
def test_filters_on_random_trees_land_what_rsync_lands(sides: Sides, seed: int, direction: str, form: str) -> None:
    diffs = run_case(sides, direction, _random(seed), "mirror", flags=RANDOM_RULES, form=form)
    assert not diffs, "\n".join(diffs)


BAD = {"local": ("a[b", "'[' has no closing ']'"), "push": ("*[[:letter:]]", "unknown character class [:letter:]"),
       "pull": ("*.[ch]\\", "it ends with a lone '\\'")}  # fmt: skip


@pytest.mark.parametrize("direction", BAD)
def test_a_bad_pattern_is_refused_before_anything_is_done(sides: Sides, direction: str) -> None:
    """rsync matches nothing with an unclosed `[`, an unknown class or a lone trailing `\\` and
    goes on; blit says so in one line and stops (exit 2), the destination untouched (docs/cli.md)."""
    src = sides.work / "src" if direction != "pull" else sides.a.modules["data"] / "src"
    dst = sides.work / "dst" if direction != "push" else sides.a.modules["data"] / "dst"
    make_tree(src, {"a[b": "a\n", "new.txt": "new\n"})
    make_tree(dst, {"extra.txt": "mirror would delete this\n"})
    before = snapshot(dst)
    sname = _ep(sides.a, "src") if direction == "pull" else str(src)
    dname = _ep(sides.a, "dst") if direction == "push" else str(dst)
    bad, why = BAD[direction]
    r = _blit(sides.a, "mirror", "--exclude", "*.o", "--include", bad, f"{sname}/", f"{dname}/")
    assert (r.returncode, r.stdout) == (2, b""), r.stderr.decode()
    assert r.stderr.decode().splitlines() == [f"blit: error: bad filter pattern '{bad}': {why}"]  # as typed: a repr doubled a backslash
    assert snapshot(dst) == before
    rmtree(src)
    rmtree(dst)



async def test_the_daemon_refuses_a_bad_pattern_itself(daemon: Daemon) -> None:
    """A client that sends a bad pattern unchecked (another implementation, an older blit) gets
    the same line as a refusal, and the daemon opens nothing."""
    bad = [p.FilterRule(include=False, pattern="*.o"), p.FilterRule(include=True, pattern="a[b")]
    async with daemon.session() as s:
        with pytest.raises(RemoteError) as info:
            await s.call(p.OpenTree(module="data", path=b"", direction="push", operation="mirror", compare=0, filters=bad))
    assert (info.value.code, info.value.message) == ("bad-request", "bad filter pattern 'a[b': '[' has no closing ']'")
    assert os.listdir(daemon.modules["data"]) == []
