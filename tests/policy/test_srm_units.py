"""Sample-ratio checks count the split's randomisation units (issue 16 item 3): keys the
first time each is routed, so a sticky split with heavy users is not a "mismatch"."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rollguard.policy.checks import evaluate
from rollguard.policy.evidence import Evidence
from rollguard.policy.schema import Check
from rollguard.policy.verdict import Verdict
from rollguard.proxy.routing import SplitTable
from rollguard.proxy.windows import VariantWindow

SRM = Check(metric="srm", on_fail="hold")


@settings(deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from("abcdefgh")), max_size=60))
def test_a_key_is_one_unit_and_a_keyless_request_is_one(keys: list[str | None]) -> None:
    window = VariantWindow("1", 10)
    for key in keys:
        window.count_routed(key)
    ev = window.evidence()
    assert ev.routed == len(keys)
    assert ev.routed_units == keys.count(None) + len({k for k in keys if k is not None})
    window.reset_routed()  # a new split: every key is new again
    window.count_routed("a")
    assert window.evidence().routed_units == 1


def _split(users: int, weight: float, seed: int) -> Evidence:
    """Zipf-active users through the real hash split: (requests, first-seen keys) per arm."""
    table = SplitTable("m", "1", "2", weight=weight, split="hash")
    windows = {"1": VariantWindow("1", 10), "2": VariantWindow("2", 10)}
    rng = np.random.default_rng(seed)
    activity = rng.zipf(1.3, users).clip(1, 2000)  # a few users send thousands of requests
    for user, n in enumerate(activity):
        key = f"user-{seed}-{user}"
        version, _ = table.choose(key)
        window = windows[version]
        for _ in range(int(n)):
            window.count_routed(key)
    return Evidence(windows["1"].evidence(), windows["2"].evidence(), weight)


def test_heavy_users_on_one_arm_are_not_a_mismatch() -> None:
    held_by_requests = held_by_keys = 0
    for seed in range(10):
        ev = _split(1000, 10.0, seed)
        by_keys = evaluate(SRM, ev, alpha=0.05)
        assert by_keys.detail["unit"] == "first-seen keys"
        held_by_keys += by_keys.verdict is Verdict.FAIL
        requests_only = Evidence(
            type(ev.stable)("1", routed=ev.stable.routed),
            type(ev.candidate)("2", routed=ev.candidate.routed),
            10.0,
        )
        held_by_requests += evaluate(SRM, requests_only, alpha=0.05).verdict is Verdict.FAIL
    assert held_by_keys == 0
    assert held_by_requests >= 3  # request counts of sticky heavy users "mismatch" often


def test_a_real_mismatch_of_keys_still_fails() -> None:
    ev = _split(2000, 10.0, 99)
    # a router bug: a third of the candidate's keys never arrive
    stable, candidate = ev.stable, ev.candidate
    assert candidate.routed_units is not None
    broken = Evidence(
        stable, type(candidate)("2", routed_units=candidate.routed_units * 2 // 3), 10.0
    )
    assert evaluate(SRM, broken, alpha=0.05).verdict is Verdict.FAIL
