"""Points in time as the CLI takes them: ISO dates and times, "1h" ago, "yesterday"."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

ACCEPTED = (
    "an ISO date or time (2026-12-01, 2026-12-01T08:30, 2026-12-01T08:30:00+02:00; "
    "naive times are UTC), a time ago as a number and a unit s, m, h, d or w "
    "(90s, 30m, 1h, 2d, 1w), or now, today, yesterday (midnight UTC)"
)

_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class BadTime(ValueError):
    """A time the CLI cannot read; its message names the text and the accepted forms."""


def parse_when(text: str, now: datetime) -> datetime:
    """The UTC instant `text` names, relative ones counted back from `now` (aware, UTC)."""
    word = text.strip().lower()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    named = {"now": now, "today": midnight, "yesterday": midnight - timedelta(days=1)}
    if word in named:
        return named[word]
    ago = _AGO.fullmatch(word)
    if ago:
        try:
            return now - timedelta(seconds=float(ago.group(1)) * _UNIT_S[ago.group(2)])
        except OverflowError:
            raise BadTime(f"{text!r} reaches before the year 1; use {ACCEPTED}") from None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadTime(f"cannot read {text!r} as a time; use {ACCEPTED}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)
