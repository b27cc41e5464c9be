"""The one SID grammar: a code tuple (c_0, ..., c_{L-1}) written as one token per level.

Level i uses the letter chr(ord('a') + i): codes (99, 225, 67) -> "<a_99><b_225><c_67>". Per-level letters
keep "code 5 at level 0" and "code 5 at level 1" different tokens, as in TIGER. Items whose tuples collide
can get an extra dedup level (the next letter: <d_0>, <d_1>, ... for 3 levels) so every item has its own
SID. Everything that writes, reads or tokenizes a SID goes through this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

LEVEL_PREFIXES = "abcdefghijklmnopqrstuvwxyz"

SID_TOKEN_RE = re.compile(r"<([a-z])_(0|[1-9][0-9]*)>")  # one SID token; group 1 letter, 2 code


def sid_token(level: int, code: int) -> str:
    """(level, code) -> "<{letter}_{code}>", e.g. (1, 225) -> "<b_225>"."""
    if not 0 <= level < len(LEVEL_PREFIXES):
        raise ValueError(f"SID level must be in [0, {len(LEVEL_PREFIXES)}), got {level}")
    if int(code) < 0:
        raise ValueError(f"SID code must be >= 0, got {code} at level {level}")
    return f"<{LEVEL_PREFIXES[level]}_{int(code)}>"


def render_sid(codes: Sequence[int]) -> str:
    """[99, 225, 67] -> "<a_99><b_225><c_67>"."""
    if len(codes) == 0:
        raise ValueError("cannot render an empty SID")
    return "".join(sid_token(i, c) for i, c in enumerate(codes))


def parse_sid(s: str) -> list[int]:
    """"<a_99><b_225><c_67>" -> [99, 225, 67]. Strict: the string must be exactly consecutive tokens
    starting at level a, no spaces, no leading zeros; anything else is a ValueError naming the string."""
    if not isinstance(s, str):
        raise ValueError(f"SID must be a str, got {type(s).__name__}: {s!r}")
    codes: list[int] = []
    pos = 0
    while pos < len(s):
        m = SID_TOKEN_RE.match(s, pos)
        if m is None:
            raise ValueError(f"malformed SID {s!r}: expected a token like <a_12> at position {pos}")
        expected = LEVEL_PREFIXES[len(codes)] if len(codes) < len(LEVEL_PREFIXES) else None
        if m.group(1) != expected:
            raise ValueError(f"malformed SID {s!r}: token {m.group(0)} at level {len(codes)} "
                             f"should use letter {expected!r}")
        codes.append(int(m.group(2)))
        pos = m.end()
    if not codes:
        raise ValueError(f"malformed SID {s!r}: no tokens")
    return codes


def sid_vocabulary(levels: int, codebook_size: int, extra_level_size: int = 0) -> list[str]:
    """All SID tokens, level-major: levels * codebook_size tokens, then extra_level_size dedup tokens."""
    toks = [sid_token(lvl, c) for lvl in range(levels) for c in range(codebook_size)]
    return toks + [sid_token(levels, c) for c in range(extra_level_size)]



def used_tokens(sid_strings: Iterable[str]) -> list[str]:
    """Distinct SID tokens used by ``sid_strings``, ordered by level then code (the tokens a model needs)."""
    pairs = {(level, code) for sid in sid_strings for level, code in enumerate(parse_sid(sid))}
    return [sid_token(level, code) for level, code in sorted(pairs)]


def is_sid_token(token: str | None) -> bool:
    """True for exactly one SID token such as ``<b_12>``."""
    return token is not None and SID_TOKEN_RE.fullmatch(token) is not None
