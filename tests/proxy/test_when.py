"""The CLI's time forms: ISO dates and times, "1h" ago, now/today/yesterday."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollguard.proxy.when import BadTime, parse_when

NOW = datetime(2026, 12, 5, 8, 30, 15, tzinfo=UTC)
moments = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@given(moments, st.integers(0, 10_000), st.sampled_from(["s", "m", "h", "d", "w"]))
def test_a_time_ago_counts_back_from_now(now: datetime, n: int, unit: str) -> None:
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    assert parse_when(f"{n}{unit}", now) == now - timedelta(seconds=n * seconds)


@given(moments)
def test_named_days_are_utc_midnights(now: datetime) -> None:
    today = parse_when("today", now)
    assert (today.hour, today.minute, today.second, today.microsecond) == (0, 0, 0, 0)
    assert today <= now < today + timedelta(days=1)
    assert parse_when("yesterday", now) == today - timedelta(days=1)
    assert parse_when("now", now) == now


@given(moments)
def test_iso_round_trips_and_naive_means_utc(moment: datetime) -> None:
    assert parse_when(moment.isoformat(), NOW) == moment
    assert parse_when(moment.replace(tzinfo=None).isoformat(), NOW) == moment


def test_offsets_are_converted_to_utc() -> None:
    assert parse_when("2026-12-01T10:00:00+02:00", NOW) == datetime(2026, 12, 1, 8, tzinfo=UTC)
    assert parse_when("2026-12-01", NOW) == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_when(" 90s ", NOW) == NOW - timedelta(seconds=90)


@pytest.mark.parametrize("text", ["", "last tuesday", "1y", "-1h", "h1", "99999999999w"])
def test_unreadable_times_name_every_accepted_form(text: str) -> None:
    with pytest.raises(BadTime) as caught:
        parse_when(text, NOW)
    for form in ("ISO date", "30m", "1h", "yesterday", "naive times are UTC"):
        assert form in str(caught.value)
