"""SpacetimeDB identity derivation (PROTOCOL.md §6.1), sans-IO.

``identity = [0xC2, 0x00] ++ BLAKE3([0xC2, 0x00] ++ id)[0:4] ++ id`` where
``id = BLAKE3(utf8(iss + "|" + sub))[0:26]``, printed as big-endian hex. ``iss`` and ``sub`` are used
exactly as given: a trailing slash changes the identity, and a ``|`` inside either lets two different
pairs collide, which is why the token broker refuses to mint such claims.
"""

from __future__ import annotations

from typing import Final

from blake3 import blake3

IDENTITY_PREFIX: Final = b"\xc2\x00"
MAX_CLAIM_BYTES: Final = 128  # SpacetimeDB's limit for iss and sub (PROTOCOL.md §6.2)


def identity_bytes(issuer: str, subject: str) -> bytes:
    """The 32 big-endian identity bytes for (iss, sub)."""
    h1 = blake3(f"{issuer}|{subject}".encode()).digest()
    id26 = h1[:26]
    checksum = blake3(IDENTITY_PREFIX + id26).digest()[:4]
    return IDENTITY_PREFIX + checksum + id26


def identity_hex(issuer: str, subject: str) -> str:
    """The 64-hex identity SpacetimeDB derives for a token with these ``iss`` and ``sub``."""
    return identity_bytes(issuer, subject).hex()


def claim_problems(issuer: str, subject: str) -> list[str]:
    """Why SpacetimeDB would refuse (or mis-derive) these claims; empty when they are fine."""
    problems = []
    for name, value in (("iss", issuer), ("sub", subject)):
        if not value:
            problems.append(f"{name} is empty")
        elif len(value.encode()) > MAX_CLAIM_BYTES:
            problems.append(f"{name} is {len(value.encode())} bytes (SpacetimeDB allows at most 128)")
        if "|" in value:
            problems.append(f"{name} contains '|', which lets two (iss, sub) pairs share one identity")
    return problems
