"""The peer benchmark's round order: paired targets adjacent, the order alternating."""

from __future__ import annotations

from load_tests.bench import report, targets


def _target(name: str) -> targets.Target:
    return targets.Target(name, f"about {name}", f"http://127.0.0.1:1/{name}", ())


def test_rounds_alternate_the_order_so_no_target_always_runs_first() -> None:
    started = [_target(n) for n in ("bare", "naive-proxy", "rollguard-proxy")]
    names = [[t.name for t in targets.round_order(started, r)] for r in (1, 2, 3, 4)]
    assert names[0] == names[2] == ["bare", "naive-proxy", "rollguard-proxy"]
    assert names[1] == names[3] == ["rollguard-proxy", "naive-proxy", "bare"]
    assert [t.name for t in started] == ["bare", "naive-proxy", "rollguard-proxy"]  # untouched


def test_every_goal_pairs_targets_that_run_next_to_each_other() -> None:
    # Whatever the direction of a round, the two targets of a goal then run back to back;
    # bare is the baseline of several, so only the in-process goal has it next door; the
    # goals against nginx and MLServer are marked as not adjacent for the same reason.
    for goal in report.GOALS:
        if (goal.baseline == "bare" and goal.target != "rollguard") or not goal.adjacent:
            continue
        gap = abs(targets.ALL.index(goal.target) - targets.ALL.index(goal.baseline))
        assert gap == 1, (goal.label, gap)
