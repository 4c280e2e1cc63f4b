"""rsync-style include/exclude rules compiled to regular expressions. Pure, no I/O.

Rules are tried in the order given and the first match decides; an entry matched by none is
included. A pattern without `/` (ignoring a trailing one) matches the entry's name at any depth; a
pattern with a `/` matches the end of the path relative to the transfer root, or, when it starts
with `/`, the whole of it. A trailing `/` matches directories only. `*` matches within one name,
`**` across `/`, `?` one character, `[...]` a class.

This module must not touch the filesystem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    include: bool
    pattern: str
    regex: re.Pattern[str]
    dir_only: bool
    on_name: bool


def _glob_to_regex(glob: str) -> str:
    out = []
    i = 0
    n = len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if i + 1 < n and glob[i + 1] == "*":
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = glob.find("]", i + 2 if i + 1 < n and glob[i + 1] in "!^" else i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = glob[i + 1 : j]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def compile_rule(include: bool, pattern: str) -> Rule:
    if not pattern or pattern == "/":
        from .errors import UsageError

        raise UsageError(f"empty filter pattern {pattern!r}")
    dir_only = pattern.endswith("/")
    p = pattern.rstrip("/")
    anchored = p.startswith("/")
    p = p.lstrip("/")
    on_name = "/" not in p and not anchored and "**" not in p
    body = _glob_to_regex(p)
    if on_name:
        rx = re.compile(f"^{body}$", re.S)
    elif anchored:
        rx = re.compile(f"^{body}$", re.S)
    else:
        rx = re.compile(f"(?:.*/)?{body}$", re.S)
    return Rule(include, pattern, rx, dir_only, on_name)


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
        for r in self.rules:
            if r.dir_only and not is_dir:
                continue
            if r.regex.match(name if r.on_name else rel):
                return not r.include
        return False

    def __getstate__(self) -> list[tuple[bool, str]]:
        return [(r.include, r.pattern) for r in self.rules]

    def __setstate__(self, state: list[tuple[bool, str]]) -> None:
        self.rules = [compile_rule(inc, pat) for inc, pat in state]
        self.active = bool(self.rules)


NO_FILTERS = Filters([])
