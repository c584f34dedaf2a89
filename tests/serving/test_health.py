"""An upstream's health after load: ready probes and outlier ejection (pure state)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rollguard.serving.health import Health, UpstreamHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _health(clock: Clock, **kwargs: float) -> UpstreamHealth:
    settings = {"unready_after": 2, "eject_after": 3, "eject_base_s": 10.0, "eject_max_s": 35.0}
    settings.update(kwargs)
    return UpstreamHealth(clock=clock, **settings)  # type: ignore[arg-type]


def test_failed_probes_in_a_row_make_it_unready_and_one_good_probe_ready() -> None:
    health = _health(Clock())
    assert health.ok and not health.failed_probes
    assert health.probed(False) is False  # one failure is not enough
    assert health.probed(True) is False and health.failed_probes == 0
    assert health.probed(False) is False
    assert health.probed(False) is True  # the second in a row
    assert health.state is Health.UNREADY and not health.ok
    assert health.probed(False) is False  # already unready: no new transition
    assert health.probed(True) is True and health.ok


def test_failed_calls_eject_for_a_doubling_back_off_up_to_its_cap() -> None:
    clock = Clock()
    health = _health(clock)
    lengths = []
    for _ in range(4):
        assert health.failed() is None and health.failed() is None
        length = health.failed()
        assert length is not None and health.state is Health.EJECTED
        lengths.append(length)
        clock.now += length - 0.001
        assert not health.ok  # still ejected just before the back-off ends
        clock.now += 0.001
        assert health.ok
    assert lengths == [10.0, 20.0, 35.0, 35.0]
    health.answered()  # a good answer after the back-off: the next ejection starts over
    for _ in range(3):
        length = health.failed()
    assert length == 10.0


def test_a_good_answer_between_failures_restarts_the_count() -> None:
    health = _health(Clock())
    for _ in range(10):
        assert health.failed() is None and health.failed() is None
        health.answered()
    assert health.ok


@given(st.lists(st.sampled_from(["ok", "fail", "tick"]), max_size=60))
def test_it_is_ejected_exactly_while_a_back_off_runs(events: list[str]) -> None:
    clock = Clock()
    health = _health(clock)
    until = 0.0
    for event in events:
        if event == "ok":
            health.answered()
        elif event == "fail":
            length = health.failed()
            if length is not None:
                assert 10.0 <= length <= 35.0
                until = clock.now + length
        else:
            clock.now += 7.0
        assert health.ok == (clock.now >= until)


@given(st.lists(st.sampled_from(["ok", "fail", "tick"]), max_size=40))
def test_an_excused_failure_is_as_if_it_had_not_happened(events: list[str]) -> None:
    """A failure every version made (the input's fault) is taken back at once: whatever
    came before, the health after fail + excuse is the health before, ejection included."""
    clock, twin_clock = Clock(), Clock()
    health, twin = _health(clock), _health(twin_clock)
    for event in events:
        for h, c in ((health, clock), (twin, twin_clock)):
            if event == "ok":
                h.answered()
            elif event == "fail":
                h.failed()
            else:
                c.now += 7.0
        health.failed()  # a shared failure, on one of the two only
        health.excused(health.serial)
        assert (health.ok, health.state, health.ejections, health.ejected_until) == (
            twin.ok,
            twin.state,
            twin.ejections,
            twin.ejected_until,
        )
        assert health.failed_calls == twin.failed_calls


def test_an_excuse_that_comes_late_or_twice_forgives_nothing() -> None:
    """Found in review: an excuse arriving after a success and new failures lifted an
    ejection those failures earned; a batched call failing several callers was excused
    once per caller, forgiving other failures."""
    clock = Clock()
    health = _health(clock)  # eject_after 3
    health.failed()
    late = health.serial
    health.answered()
    for _ in range(3):
        health.failed()
    assert health.state is Health.EJECTED
    health.excused(late)  # something was recorded since: nothing to take back
    assert health.state is Health.EJECTED
    health = _health(clock)
    health.failed()
    health.failed()
    batch = health.serial
    health.excused(batch)
    health.excused(batch)  # the same failure again (a second caller of the batch)
    assert health.failed_calls == 1


@given(st.permutations(list(range(1, 6))), st.integers(1, 5))
def test_concurrent_shared_failures_excused_in_any_order_leave_it_whole(
    order: list[int], count: int
) -> None:
    """Several inputs every version fails, in flight at once: their failures land back
    to back (ejecting it at the third), and their excuses come back in any order; in the
    end nothing is counted and it is not ejected."""
    clock = Clock()
    health = _health(clock)  # eject_after 3
    serials = []
    for _ in range(count):
        health.failed()
        serials.append(health.serial)
    for i in order:
        if i <= count:
            health.excused(serials[i - 1])
    assert health.ok and health.failed_calls == 0 and health.ejections == 0
