"""policy.lifecycle in fleet mode: no counts carried forward, and following another
process's state (`follow`) with only the effects that route and count."""

from __future__ import annotations

from dataclasses import replace

from rollguard.policy import lifecycle
from rollguard.policy.effects import ResetWindows, Route, Save, SetLatencyThreshold
from rollguard.policy.state import Phase
from tests.policy.lifecycle_support import Env, make_rollout


def test_a_fleet_tick_carries_no_counts_and_saves_no_bookkeeping() -> None:
    env = Env(make_rollout(checks=[]))
    env.traffic.serve()
    env.now += 5
    transition = lifecycle.tick(
        env.rollout, env.state, env.traffic.evidence(), env.now, carry=False
    )
    assert (transition.state.carried, transition.state.seen) == (None, None)
    assert transition.effects == ()  # the file mode would save `seen` here
    carried = lifecycle.tick(env.rollout, env.state, env.traffic.evidence(), env.now)
    assert carried.state.seen is not None and isinstance(carried.effects[0], Save)


def test_a_fleet_restore_does_not_count_the_last_deciders_sample_twice() -> None:
    env = Env(make_rollout())
    env.run_to_step(1)
    assert env.saved is not None and env.saved.seen is not None
    transition = lifecycle.restore(env.rollout, env.saved, env.now, carry=False)
    assert transition.state.carried == env.saved.carried  # not plus `seen`
    assert (transition.state.step, transition.state.weight) == (1, 50)
    filed = lifecycle.restore(env.rollout, env.saved, env.now)
    assert filed.state.carried == env.saved.seen


def test_following_the_same_generation_only_routes() -> None:
    env = Env(make_rollout())
    before = env.state
    env.run_to_step(1)
    transition = lifecycle.follow(env.rollout, before, env.state)
    assert transition.state == env.state
    kinds = [type(e) for e in transition.effects]
    # The threshold was frozen meanwhile: it is set; the windows keep counting.
    assert kinds == [SetLatencyThreshold, Route]
    assert transition.effects[-1] == Route(env.state, False)
    again = lifecycle.follow(env.rollout, env.state, replace(env.state, reason="later"))
    assert [type(e) for e in again.effects] == [Route]


def test_following_a_new_generation_or_a_begun_rollout_resets_the_windows() -> None:
    env = Env(make_rollout())
    newer = replace(env.state, generation=env.state.generation + 1)
    assert isinstance(lifecycle.follow(env.rollout, env.state, newer).effects[0], ResetWindows)
    waiting = lifecycle.begin(env.rollout, env.now, candidate="loading").state
    assert waiting.phase is Phase.WAITING
    began = lifecycle.follow(env.rollout, waiting, env.state)
    assert isinstance(began.effects[0], ResetWindows)
    first = lifecycle.follow(env.rollout, None, env.state)
    assert [type(e) for e in first.effects] == [ResetWindows, SetLatencyThreshold, Route]
