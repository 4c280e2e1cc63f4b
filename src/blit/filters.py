"""rsync-style include/exclude rules, matched as rsync 3.x matches them. Pure, no I/O.

Rules are tried in the order given and the first match decides; an entry matched by none is
included. Matching is on the bytes of the name (os.fsencode), as rsync's is: `?` is one byte.

How a pattern is matched (rsync's exclude.c rule_matches and wildmatch, turned into one regular
expression per rule):
- A trailing `/` (one) matches directories only and is not part of the pattern.
- A pattern with no `/` and no `**` matches the entry's name, at any depth.
- A leading `/` anchors the pattern to the transfer root: it matches the whole relative path.
- Otherwise a pattern with a `/` matches the last (slashes + 1) components of the path; one
  with `**` matches the path from its start or after any `/`, and one starting with `**` also
  matches at the root (`**/x` matches `x`). A trailing `/***` also matches the directory itself.
- `*` matches within one component, `**` across `/`, `?` one byte but `/`, `[...]` one byte of a
  class (`!` or `^` negates, ranges, `[:alpha:]` and rsync's other classes, ASCII only; never
  `/`). In a pattern holding `*`, `?` or `[`, `\\` makes the next character literal; a pattern
  with none of them is compared literally, backslashes included.

Where rsync silently matches nothing (an unclosed `[`, an unknown `[:class:]`, a lone trailing
`\\`), compile_rule raises UsageError naming the pattern instead (docs/cli.md).

This module must not touch the filesystem.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UsageError

def _ascii(pred: Callable[[str], bool]) -> frozenset[int]:
    return frozenset(c for c in range(128) if pred(chr(c)))


_CLASSES: dict[bytes, frozenset[int]] = {
    b"alnum": _ascii(str.isalnum),
    b"alpha": _ascii(str.isalpha),
    b"blank": frozenset(b" \t"),
    b"cntrl": frozenset([*range(32), 127]),
    b"digit": frozenset(b"0123456789"),
    b"graph": frozenset(range(33, 127)),
    b"lower": _ascii(str.islower),
    b"print": frozenset(range(32, 127)),
    b"punct": frozenset(c for c in range(33, 127) if not chr(c).isalnum()),
    b"space": frozenset(b" \t\n\v\f\r"),
    b"upper": _ascii(str.isupper),
    b"xdigit": frozenset(b"0123456789abcdefABCDEF"),
}
"""rsync's [:name:] classes (wildmatch.c, ctype in a UTF-8 or C locale: ASCII only)."""
_SLASH = ord("/")


@dataclass(frozen=True)
class Rule:
    include: bool
    pattern: str
    regex: re.Pattern[bytes]
    dir_only: bool
    on_name: bool
    """Matched against the entry's name only (no `/` and no `**` in the pattern)."""
    lead_slash: bool
    """The path is matched with a `/` in front (a pattern starting with `**`)."""
    dir_slash: bool
    """A directory's path is matched with a `/` after it (a pattern ending in `***`)."""


def _quoted(pattern: str) -> str:
    """A pattern as it was typed, in single quotes (a repr doubled its backslashes); one with a
    control character or a byte that is not UTF-8 as its repr (one line whatever it holds)."""
    return f"'{pattern}'" if pattern.isprintable() else repr(pattern)


def _bad(pattern: str, why: str) -> UsageError:
    return UsageError(f"bad filter pattern {_quoted(pattern)}: {why}")


def _class(p: bytes, i: int, pattern: str) -> tuple[str, int]:
    """The class starting at p[i] == '['; returns (regex, index after its ']')."""
    n = len(p)
    i += 1
    negated = i < n and p[i] in b"!^"
    if negated:
        i += 1
    members: set[int] = set()
    prev = -1  # the previous single byte, which a following '-' may start a range from
    first = True
    while True:
        if i >= n:
            raise _bad(pattern, "'[' has no closing ']'")
        c = p[i]
        if c == ord("]") and not first:
            i += 1
            break
        first = False
        if c == ord("\\"):
            i += 1
            if i >= n:
                raise _bad(pattern, "'[' has no closing ']'")
            c = p[i]
            members.add(c)
            prev = c
        elif c == ord("-") and prev >= 0 and i + 1 < n and p[i + 1] != ord("]"):
            i += 1
            hi = p[i]
            if hi == ord("\\"):
                i += 1
                if i >= n:
                    raise _bad(pattern, "'[' has no closing ']'")
                hi = p[i]
            members.update(range(prev, hi + 1))
            prev = -1
        elif c == ord("[") and i + 1 < n and p[i + 1] == ord(":"):
            end = p.find(b"]", i + 2)
            if end < 0:
                raise _bad(pattern, "'[' has no closing ']'")
            if end - (i + 2) < 1 or p[end - 1] != ord(":"):
                # No ":]": the '[' is an ordinary member (rsync reads on from the ':').
                members.add(c)
                prev = c
            else:
                name = p[i + 2 : end - 1]
                if name not in _CLASSES:
                    raise _bad(pattern, f"unknown character class [:{os.fsdecode(name)}:]")
                members |= _CLASSES[name]
                prev = -1
                i = end
        else:
            members.add(c)
            prev = c
        i += 1
    if negated:
        members = set(range(256)) - members
    members.discard(_SLASH)  # no class matches '/'
    if not members:
        return "(?!)", i
    return "[" + "".join(f"\\x{b:02x}" for b in sorted(members)) + "]", i


def _wild_to_regex(p: bytes, pattern: str) -> str:
    out: list[str] = []
    i, n = 0, len(p)
    while i < n:
        c = p[i]
        if c == ord("*"):
            j = i
            while j < n and p[j] == ord("*"):
                j += 1
            out.append(".*" if j - i > 1 else "[^/]*")
            i = j
            continue
        if c == ord("?"):
            out.append("[^/]")
        elif c == ord("["):
            rx, i = _class(p, i, pattern)
            out.append(rx)
            continue
        elif c == ord("\\"):
            i += 1
            if i >= n:
                raise _bad(pattern, "it ends with a lone '\\'")
            out.append(f"\\x{p[i]:02x}")
        else:
            out.append(f"\\x{c:02x}")
        i += 1
    return "".join(out)


def compile_rule(include: bool, pattern: str) -> Rule:
    if not pattern or pattern == "/":
        raise UsageError(f"empty filter pattern {_quoted(pattern)}")
    p = os.fsencode(pattern)
    dir_only = len(p) > 1 and p.endswith(b"/")
    if dir_only:
        p = p[:-1]
    slashes = p.count(b"/")
    anchored = p.startswith(b"/")
    wild = any(ch in p for ch in b"*?[")
    wild2 = wild and b"**" in p
    lead_slash = wild2 and p.startswith(b"**")
    dir_slash = wild2 and p.endswith(b"***")
    on_name = slashes == 0 and not wild2
    body = _wild_to_regex(p[1:] if anchored else p, pattern) if wild else re.escape(p[1:] if anchored else p).decode("latin-1")
    if on_name or anchored or lead_slash:
        rx = f"{body}\\Z"  # the whole name, or the path from its start
    else:
        # The last `slashes + 1` components, or (with `**`) from after any '/'.
        rx = f"(?:.*/)?{body}\\Z"
    return Rule(include, pattern, re.compile(rx.encode("latin-1"), re.S), dir_only, on_name, lead_slash, dir_slash)


class Filters:
    """An ordered rule list. `excluded(rel, name, is_dir)` is the only question asked of it."""

    __slots__ = ("rules", "active")

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self.active = bool(rules)

    @classmethod
    def from_args(cls, ordered: list[tuple[bool, str]]) -> Filters:
        return cls([compile_rule(inc, pat) for inc, pat in ordered])

    def excluded(self, rel: str, name: str, is_dir: bool) -> bool:
        """rel: the path relative to the transfer root (str, surrogateescape); name: its last
        component."""
        path = os.fsencode(rel)
        base = path[path.rfind(b"/") + 1 :]
        for r in self.rules:
            if r.dir_only and not is_dir:
                continue
            if r.on_name:
                subject = base
            else:
                subject = path
                if r.lead_slash:
                    subject = b"/" + subject
                if r.dir_slash and is_dir:
                    subject += b"/"
            if r.regex.match(subject):
                return not r.include
        return False

    def __getstate__(self) -> list[tuple[bool, str]]:
        return [(r.include, r.pattern) for r in self.rules]

    def __setstate__(self, state: list[tuple[bool, str]]) -> None:
        self.rules = [compile_rule(inc, pat) for inc, pat in state]
        self.active = bool(self.rules)


NO_FILTERS = Filters([])
