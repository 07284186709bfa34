"""Time arithmetic: send windows across DST, waits, zone resolution and A/B assignment."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from nurture.journey.schedule import (
    choose_variant,
    due_after,
    effective_zone,
    in_window,
    next_opening,
)
from nurture.spec.schema import SendWindow, Variant, Wait

WEEKDAYS_9_TO_1730 = SendWindow(
    days=["mon", "tue", "wed", "thu", "fri"], start=time(9), end=time(17, 30)
)
NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def test_step_due_at_3am_waits_for_9am_local_across_spring_forward() -> None:
    # US clocks jump from 02:00 to 03:00 on Sunday 2026-03-08. A step falls due at 03:00
    # local on Monday 03-09 (07:00 UTC, EDT = UTC-4): it waits until 09:00 EDT = 13:00 UTC.
    due = datetime(2026, 3, 9, 7, 0, tzinfo=UTC)
    assert due.astimezone(NEW_YORK).hour == 3
    opening = next_opening(due, NEW_YORK, WEEKDAYS_9_TO_1730)
    assert opening == datetime(2026, 3, 9, 13, 0, tzinfo=UTC)
    assert opening.astimezone(NEW_YORK).time() == time(9, 0)
    # The Friday before, 03:00 EST (UTC-5) is 08:00 UTC and the window opens at 14:00 UTC.
    friday = next_opening(datetime(2026, 3, 6, 8, 0, tzinfo=UTC), NEW_YORK, WEEKDAYS_9_TO_1730)
    assert friday == datetime(2026, 3, 6, 14, 0, tzinfo=UTC)


def test_window_after_fall_back_and_over_the_weekend() -> None:
    # Berlin falls back on Sunday 2026-10-25. Saturday evening waits for Monday 09:00 CET.
    sat = datetime(2026, 10, 24, 20, 0, tzinfo=UTC)
    opening = next_opening(sat, BERLIN, WEEKDAYS_9_TO_1730)
    assert opening == datetime(2026, 10, 26, 8, 0, tzinfo=UTC)  # 09:00 CET = UTC+1


def test_inside_the_window_is_now_and_end_is_exclusive() -> None:
    inside = datetime(2026, 3, 3, 15, 0, tzinfo=UTC)  # 10:00 in New York, a Tuesday
    assert in_window(inside, NEW_YORK, WEEKDAYS_9_TO_1730)
    at_end = datetime(2026, 3, 3, 22, 30, tzinfo=UTC)  # 17:30 EST
    assert not in_window(at_end, NEW_YORK, WEEKDAYS_9_TO_1730)
    assert next_opening(at_end, NEW_YORK, WEEKDAYS_9_TO_1730) == datetime(
        2026, 3, 4, 14, 0, tzinfo=UTC
    )


def test_time_in_a_dst_gap_opens_at_the_transition() -> None:
    window = SendWindow(days=["sun"], start=time(2, 30), end=time(4, 0))
    sunday = datetime(2026, 3, 8, 5, 0, tzinfo=UTC)  # 00:00 EST on the day of the jump
    opening = next_opening(sunday, NEW_YORK, window)
    assert opening == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)  # 03:00 EDT, the first valid time


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31)),
    st.sampled_from(["America/New_York", "Europe/Berlin", "Australia/Sydney", "Asia/Kolkata",
                     "Pacific/Chatham", "UTC"]),
    st.sets(st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]), min_size=1),
    st.integers(0, 22),
    st.integers(1, 10),
)  # fmt: skip
def test_next_opening_is_inside_the_window_and_never_early(
    naive: datetime, tz_name: str, days: set[str], start_hour: int, length: int
) -> None:
    now = naive.replace(tzinfo=UTC)
    tz = ZoneInfo(tz_name)
    window = SendWindow(
        days=sorted(days), start=time(start_hour), end=time(min(23, start_hour + length), 59)
    )  # type: ignore[arg-type]
    opening = next_opening(now, tz, window)
    assert opening >= now
    assert opening - now <= timedelta(days=8)
    local = opening.astimezone(tz)
    assert local.strftime("%a").lower() in days
    just_before = (opening - timedelta(seconds=1)).astimezone(tz)
    at_dst_jump = just_before.utcoffset() != local.utcoffset()
    if opening > now:
        assert local.time() == window.start or at_dst_jump  # it opens exactly at the start
    else:
        assert window.start <= local.time() or at_dst_jump
    assert local.time() < window.end
    assert next_opening(opening, tz, window) == opening  # idempotent: it is open then


def test_weekday_wait_is_the_next_occurrence_in_local_time() -> None:
    wait = Wait.parse("next mon at 09:00")
    tuesday = datetime(2026, 3, 3, 15, 0, tzinfo=UTC)
    assert due_after(tuesday, wait, NEW_YORK) == datetime(2026, 3, 9, 13, 0, tzinfo=UTC)
    monday_early = datetime(2026, 3, 9, 12, 0, tzinfo=UTC)  # 08:00 EDT: later the same day
    assert due_after(monday_early, wait, NEW_YORK) == datetime(2026, 3, 9, 13, 0, tzinfo=UTC)
    assert due_after(tuesday, Wait.parse("2d"), NEW_YORK) == tuesday + timedelta(days=2)


def test_zone_resolution_order() -> None:
    assert effective_zone("Asia/Tokyo", "Europe/Paris", "US", "UTC").key == "Asia/Tokyo"
    assert effective_zone(None, "Europe/Paris", "US", "UTC").key == "Europe/Paris"
    assert effective_zone(None, None, "de", "UTC").key == "Europe/Berlin"
    assert effective_zone("Not/AZone", None, None, "America/Chicago").key == "America/Chicago"


def test_variants_are_deterministic_and_weighted() -> None:
    variants = [Variant(template="a", weight=80), Variant(template="b", weight=20)]
    picks = [choose_variant(i, "c", "s", variants) for i in range(5000)]
    assert picks == [choose_variant(i, "c", "s", variants) for i in range(5000)]
    share = Counter(picks)[0] / len(picks)
    assert 0.77 < share < 0.83
