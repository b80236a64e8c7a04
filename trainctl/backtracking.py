"""Whether a user's regular expression can take exponential time (a repeat of a repeat), so
config validation and the metric parser can refuse it before it hangs the launcher."""

from __future__ import annotations

import re
from typing import Any

BACKTRACKING_HINT = ("Repeat the inner part only, e.g. (?P<x>a+)b instead of (?P<x>(a+)+)b, or "
                     "use a character class: (?P<loss>[0-9.]+).")


def backtracking_risk(pattern: str) -> str | None:
    """Why `pattern` can take exponential time on some line (a repeat of a repeat), or None.

    Python's re backtracks: `(a+)+b` on a line of 30 a's tries 2**30 ways. A repeat inside a
    repeat whose length varies is the shape of every such pattern, so it is refused up front.
    """
    try:
        from re import _constants as c  # type: ignore[attr-defined]
        from re import _parser as p  # type: ignore[attr-defined]
    except ImportError:  # Python 3.10
        import sre_constants as c  # type: ignore[no-redef]
        import sre_parse as p  # type: ignore[no-redef]
    try:
        tree = p.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return None  # re.compile reports it
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT}
    atomic = {getattr(c, "POSSESSIVE_REPEAT", None), getattr(c, "ATOMIC_GROUP", None)} - {None}

    def walk(items: Any, inside_repeat: bool) -> bool:
        for op, av in items:
            if op in repeats:
                low, high, sub = av
                varies = high != low and high != 1
                if (varies and inside_repeat) or walk(sub, inside_repeat or varies):
                    return True
            elif op in atomic:
                continue  # no backtracking into it
            elif op is c.SUBPATTERN:
                parts = [av[-1]]
            elif op is c.BRANCH:
                parts = av[1]
            elif op in (c.ASSERT, c.ASSERT_NOT):
                parts = [av[1]]
            elif op is c.GROUPREF_EXISTS:
                parts = [branch for branch in av[1:] if branch is not None]
            else:
                continue
            if op not in repeats and any(walk(part, inside_repeat) for part in parts):
                return True
        return False

    if walk(tree, False):
        return ("repeats a part that itself repeats (like (a+)+), which can take exponential "
                "time on some lines and hang the launcher")
    return None
