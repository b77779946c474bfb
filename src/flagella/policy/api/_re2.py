"""HTTP rule regexes: RE2 syntax and semantics, as Envoy's ``safe_regex`` applies them.

A rule's ``method``, ``path`` and ``host`` are regexes that must match the whole
value. Python's `re` backtracks: ``/(a+)+$`` against 29 characters takes seconds,
and a policy author (or anyone who can import policy into the agent) could stall
whatever evaluates it. RE2 matches in time linear in the text, for a program of
bounded size, and rejects what needs backtracking (backreferences, lookaround).

One compiler serves validation (`_parse`) and evaluation (`flagella.policy.l7`),
so a pattern that validates is exactly a pattern that evaluates, with the same
bound the proxy will get:

* ``RE2_MAX_PROGRAM_SIZE`` (1000) caps the compiled program. Envoy's default
  (runtime ``re2.max_program_size.error_level``) is 100, which already rejects
  ``/v[0-9]+/(users|orders)/[A-Za-z0-9_-]{1,64}``; 1000 admits realistic paths
  while keeping each match at most ~1000 steps per character. The xDS server must
  give Envoy the same number (``re2.max_program_size.error_level: 1000``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

import re2  # type: ignore[import-untyped]

#: Largest compiled RE2 program an HTTP regex may have (Envoy gets the same bound).
RE2_MAX_PROGRAM_SIZE: Final = 1000

_OPTIONS: Final = re2.Options()
_OPTIONS.log_errors = False  # the error reaches the user as a field error instead


class RegexError(ValueError):
    """A pattern that RE2 rejects, or whose program exceeds `RE2_MAX_PROGRAM_SIZE`."""


@lru_cache(maxsize=4096)
def compile_re2(pattern: str) -> re2._Regexp:
    """Compile ``pattern`` for full matching; raise `RegexError` with RE2's reason."""
    try:
        compiled = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "rejected"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(str(reason)) from None
    except (UnicodeError, TypeError) as exc:
        raise RegexError(f"not encodable as UTF-8: {exc}") from None
    if compiled.programsize > RE2_MAX_PROGRAM_SIZE:
        raise RegexError(
            f"program size {compiled.programsize} exceeds the limit of {RE2_MAX_PROGRAM_SIZE}"
        )
    return compiled


def full_match(pattern: str, value: str) -> bool:
    """Whether ``value`` matches all of ``pattern`` (an empty pattern matches anything).

    A value that is not valid Unicode text (a lone surrogate) never matches: no
    HTTP request can carry it.
    """
    if not pattern:
        return True
    try:
        return compile_re2(pattern).fullmatch(value) is not None
    except UnicodeError:
        return False
