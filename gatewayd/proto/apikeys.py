"""gatewayd API keys: format, offline checks and keyed hashing (SECURITY.md "API keys"). Sans-IO.

Format::

    gw_live_<key id>_<secret><checksum>
    gw_test_4f3k2m9q1x7c_Vq8...(32 chars)...3fZk9Q

* ``gw_live_`` / ``gw_test_``: the typed prefix (secret scanners and people recognise it);
* key id: the public, non-secret lookup id, 3-32 chars of ``[a-z0-9-]`` (random 12 by default);
* secret: 32 base62 characters from ``secrets`` (~190 bits, above SECURITY.md's 160);
* checksum: 6 base62 characters of CRC-32 over everything before it, so a mistyped or truncated
  key is refused offline, before any store lookup or rate-limit bookkeeping for its id.

The store keeps only ``HMAC-SHA256(pepper, key)`` (a keyed hash: a stolen database alone cannot
be used to test guesses) and compares with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import zlib
from dataclasses import dataclass
from typing import Final, Literal

from gatewayd.proto.tokens import TokenInvalid

PREFIXES: Final = {"live": "gw_live_", "test": "gw_test_"}
BASE62: Final = string.digits + string.ascii_uppercase + string.ascii_lowercase
SECRET_CHARS: Final = 32  # 32 * log2(62) = 190.5 bits
CHECKSUM_CHARS: Final = 6  # 62**6 > 2**32: room for a whole CRC-32
KEY_ID_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{2,31}")
MAX_KEY_CHARS: Final = 8 + 32 + 1 + SECRET_CHARS + CHECKSUM_CHARS
_SHAPE: Final = re.compile(
    rf"gw_(live|test)_([a-z0-9][a-z0-9-]{{2,31}})_([0-9A-Za-z]{{{SECRET_CHARS}}})([0-9A-Za-z]{{{CHECKSUM_CHARS}}})"
)

Env = Literal["live", "test"]


@dataclass(frozen=True, slots=True)
class ParsedKey:
    env: Env
    key_id: str
    full: str

    def __repr__(self) -> str:  # never print the secret
        return f"ParsedKey({self.env}, {self.key_id})"


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(BASE62[r])
    return "".join(reversed(out))


def checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_CHARS)


def new_key_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))


def make_key(env: Env, key_id: str) -> str:
    """A fresh API key with ``key_id`` (shown once, never stored)."""
    if not KEY_ID_RE.fullmatch(key_id):
        raise ValueError("key id: 3-32 chars of a-z, 0-9 and '-', starting with a letter or digit")
    secret = "".join(secrets.choice(BASE62) for _ in range(SECRET_CHARS))
    body = f"{PREFIXES[env]}{key_id}_{secret}"
    return body + checksum(body)


def looks_like_api_key(token: str) -> bool:
    return token.startswith(tuple(PREFIXES.values()))


def parse_key(token: str) -> ParsedKey:
    """Offline checks (prefix, shape, checksum). Raises :class:`TokenInvalid` (malformed)."""
    if len(token) > MAX_KEY_CHARS:
        raise TokenInvalid("malformed API key (too long)", code="malformed_api_key")
    m = _SHAPE.fullmatch(token)
    if m is None:
        raise TokenInvalid("malformed API key (expected gw_live_<id>_<secret>)", code="malformed_api_key")
    if not hmac.compare_digest(checksum(token[:-CHECKSUM_CHARS]), m.group(4)):
        raise TokenInvalid(
            "malformed API key (checksum mismatch: mistyped or truncated)", code="malformed_api_key"
        )
    env: Env = "live" if m.group(1) == "live" else "test"
    return ParsedKey(env, m.group(2), token)


def key_hash(pepper: bytes, key: str) -> bytes:
    """The stored form: HMAC-SHA256 keyed with the pepper."""
    return hmac.new(pepper, key.encode("ascii"), hashlib.sha256).digest()


# Compared against when a key id is unknown, so that unknown ids cost the same work.
DUMMY_HASH: Final = bytes(32)
