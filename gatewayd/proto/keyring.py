"""The broker's key rotation schedule (sans-IO; ``now`` is Unix seconds passed in).

Theory of operation
-------------------
SpacetimeDB fetches an issuer's JWKS at most every 300 s and does not refetch when a token names a
``kid`` it has not seen (PROTOCOL.md §6.3). So a key goes through these states::

    pending    published in the JWKS, not yet used      now <  activate_at
    signing    the newest key whose activate_at passed   (exactly one, once any key is active)
    retiring   superseded, still published               until its last token expired
    retired    unpublished (and deleted from disk)       now >= successor.activate_at
                                                                + token lifetime + margin

``activate_at`` of a new key is ``created_at + publish_lead_s``, where ``publish_lead_s`` is at
least SpacetimeDB's refresh period plus a margin: by the time we sign with it, every SpacetimeDB
node has refetched a JWKS that contains it. A superseded key keeps being published until every
token it signed has expired: the last one was minted just before the successor took over, and
lives ``max_token_lifetime_s``.

The first key of an empty ring activates at once (nobody has cached a JWKS of ours yet).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class KeyState(str, Enum):
    PENDING = "pending"
    SIGNING = "signing"
    RETIRING = "retiring"
    RETIRED = "retired"


@dataclass(frozen=True, slots=True)
class KeyTimes:
    kid: str
    created_at: float
    activate_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    publish_lead_s: float
    max_token_lifetime_s: float
    retire_margin_s: float
    rotate_after_s: float  # 0: never automatically


def _by_activation(keys: Sequence[KeyTimes]) -> list[KeyTimes]:
    return sorted(keys, key=lambda k: (k.activate_at, k.created_at, k.kid))


def signing_key(keys: Sequence[KeyTimes], now: float) -> KeyTimes | None:
    """The key to sign with now: the most recently activated one."""
    active = [k for k in _by_activation(keys) if k.activate_at <= now]
    return active[-1] if active else None


def states(keys: Sequence[KeyTimes], now: float, schedule: Schedule) -> dict[str, KeyState]:
    ordered = _by_activation(keys)
    current = signing_key(keys, now)
    out: dict[str, KeyState] = {}
    for i, k in enumerate(ordered):
        if k.activate_at > now:
            out[k.kid] = KeyState.PENDING
        elif current is not None and k.kid == current.kid:
            out[k.kid] = KeyState.SIGNING
        else:
            successor = ordered[i + 1]  # exists: k is active but not the newest active key
            done = successor.activate_at + schedule.max_token_lifetime_s + schedule.retire_margin_s
            out[k.kid] = KeyState.RETIRED if now >= done else KeyState.RETIRING
    return out


def published(keys: Sequence[KeyTimes], now: float, schedule: Schedule) -> list[str]:
    """kids to serve in the JWKS now (pending, signing and retiring keys)."""
    st = states(keys, now, schedule)
    return [k.kid for k in _by_activation(keys) if st[k.kid] is not KeyState.RETIRED]


def rotation_due(keys: Sequence[KeyTimes], now: float, schedule: Schedule) -> bool:
    """True when a new key should be created now: none pending, and the signing key is older than
    ``rotate_after_s`` (or there is no key at all)."""
    if not keys:
        return True
    if any(k.activate_at > now for k in keys):
        return False
    current = signing_key(keys, now)
    if current is None:
        return False
    return bool(schedule.rotate_after_s) and now - current.activate_at >= schedule.rotate_after_s


def next_event(keys: Sequence[KeyTimes], now: float, schedule: Schedule) -> float | None:
    """The next time the schedule changes by itself (an activation, a retirement, a rotation)."""
    times: list[float] = [k.activate_at for k in keys if k.activate_at > now]
    ordered = _by_activation(keys)
    for successor in ordered[1:]:
        done = successor.activate_at + schedule.max_token_lifetime_s + schedule.retire_margin_s
        if done > now:
            times.append(done)
    current = signing_key(keys, now)
    pending = any(k.activate_at > now for k in keys)
    if current is not None and schedule.rotate_after_s and not pending:
        times.append(max(now, current.activate_at + schedule.rotate_after_s))
    return min(times) if times else None
