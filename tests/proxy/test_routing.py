"""Split routing: sticky, monotone, accurate hash splits; random splits; the router."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from rollguard.proxy.routing import BUCKETS, KeySource, Router, SplitTable, bucket

ROOT = Path(__file__).resolve().parents[2]

keys = st.text(st.characters(exclude_categories=()), min_size=1, max_size=40)
weights = st.floats(min_value=0, max_value=100, allow_nan=False)


def canary(weight: float, split: str = "hash", rng: random.Random | None = None) -> SplitTable:
    return SplitTable(
        model="fraud",
        stable="1.0.0",
        candidate="1.1.0",
        weight=weight,
        split="hash" if split == "hash" else "random",
        key_source=KeySource.parse("header:x-user-id"),
        rng=rng or random.Random(),
    )


@given(keys)
def test_bucket_in_range(key: str) -> None:
    assert 0 <= bucket(key) < BUCKETS


def test_undecodable_header_bytes_still_hash() -> None:
    key = b"user-\xff".decode("utf-8", "surrogateescape")
    assert bucket(key) == bucket(key)
    assert 0 <= bucket("\ud800") < BUCKETS


@given(keys, weights)
def test_same_key_same_variant_across_tables(key: str, weight: float) -> None:
    assert canary(weight).choose(key) == canary(weight).choose(key)


def test_buckets_match_in_a_fresh_process_with_another_hash_seed() -> None:
    sample = [f"user-{i}" for i in range(200)] + ["", "é", "a" * 1000]
    code = (
        "import sys, json; from rollguard.proxy.routing import bucket; "
        "print(json.dumps([bucket(k) for k in json.load(sys.stdin)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(sample),
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert json.loads(out.stdout) == [bucket(k) for k in sample]


def test_bucket_values_are_pinned() -> None:
    # Changing the hash would move users between variants across an upgrade.
    assert [bucket(k) for k in ("alice", "bob", "user-1")] == [1949, 4049, 1543]


@given(keys, weights, weights)
def test_raising_the_weight_only_moves_keys_to_the_candidate(
    key: str, w1: float, w2: float
) -> None:
    low, high = sorted((w1, w2))
    if canary(low).choose(key)[1] == "candidate":
        assert canary(high).choose(key)[1] == "candidate"


def test_hash_split_accuracy_90_10() -> None:
    rng = random.Random(7)
    table = canary(10.0)
    n = 20_000
    hits = sum(table.choose(f"{rng.getrandbits(64):x}")[1] == "candidate" for _ in range(n))
    assert abs(hits / n - 0.10) < 0.01


def test_random_split_accuracy_90_10() -> None:
    table = canary(10.0, "random", random.Random(11))
    n = 20_000
    hits = sum(table.choose(None)[1] == "candidate" for _ in range(n))
    assert abs(hits / n - 0.10) < 0.01


def test_hash_without_key_falls_back_to_random() -> None:
    table = canary(50.0, "hash", random.Random(3))
    roles = {table.choose(None)[1] for _ in range(200)}
    assert roles == {"stable", "candidate"}


@given(keys)
def test_weight_extremes(key: str) -> None:
    for split in ("hash", "random"):
        assert canary(0.0, split).choose(key) == ("1.0.0", "stable")
        assert canary(100.0, split).choose(key) == ("1.1.0", "candidate")
        assert canary(0.0, split).choose(None) == ("1.0.0", "stable")
        assert canary(100.0, split).choose(None) == ("1.1.0", "candidate")


def test_threshold_in_basis_points() -> None:
    assert canary(12.34).threshold == 1234
    assert canary(0.0).threshold == 0
    assert canary(100.0).threshold == BUCKETS


@pytest.mark.parametrize("weight", [-0.1, 100.1, float("nan")])
def test_bad_weight_rejected(weight: float) -> None:
    with pytest.raises(ValueError, match="weight"):
        canary(weight)


def test_single_version_table() -> None:
    table = SplitTable.single("iris", "3")
    assert table.candidate is None
    assert table.choose("anyone") == ("3", "stable")
    assert table.choose(None) == ("3", "stable")
    with pytest.raises(ValueError, match="without a candidate"):
        SplitTable(model="iris", stable="3", weight=5)


def test_key_source_parse_and_extract() -> None:
    header = KeySource.parse("header:x-user-id")
    cookie = KeySource.parse("cookie:session")
    assert (header.kind, header.name, str(header)) == ("header", "x-user-id", "header:x-user-id")
    assert header.extract({"x-user-id": "u1"}, {"x-user-id": "c"}) == "u1"
    assert cookie.extract({"session": "h"}, {"session": "s9"}) == "s9"
    assert header.extract({}, {}) is None
    assert header.extract({"x-user-id": ""}, {}) is None
    for bad in ("x-user-id", "query:a", "header:", ""):
        with pytest.raises(ValueError, match="expected"):
            KeySource.parse(bad)


def test_key_source_with_case_insensitive_headers() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    headers = CIMultiDictProxy(CIMultiDict({"X-User-Id": "u42"}))
    assert KeySource.parse("header:x-user-id").extract(headers, {}) == "u42"


def test_router_copy_on_write() -> None:
    router = Router([SplitTable.single("a", "1")])
    before = router.tables()
    router.set_table(canary(5.0))
    assert router.table("fraud") == canary(5.0)
    assert set(before) == {"a"}  # an earlier snapshot never changes under a reader
    assert set(router.tables()) == {"a", "fraud"}
    router.set_table(canary(25.0))
    table = router.table("fraud")
    assert table is not None and table.weight == 25.0
    router.remove("fraud")
    router.remove("missing")
    assert router.table("fraud") is None
    assert set(router.tables()) == {"a"}


def test_router_concurrent_writers_lose_nothing() -> None:
    router = Router()

    def write(prefix: str) -> None:
        for i in range(300):
            router.set_table(SplitTable.single(f"{prefix}{i}", "1"))

    threads = [threading.Thread(target=write, args=(p,)) for p in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(router.tables()) == 900


def test_stickiness_key_from_headers_or_cookies() -> None:
    from rollguard.proxy.routing import stickiness_key

    def gateway(source: str) -> Router:
        table = SplitTable(
            model="m", stable="1", candidate="2", weight=50, key_source=KeySource.parse(source)
        )
        return Router([table])

    by_header = gateway("header:X-User-Id")
    assert stickiness_key(by_header, "m", {"x-user-id": "u-7"}) == "u-7"  # lower-case names
    assert stickiness_key(by_header, "m", {}) is None
    assert stickiness_key(by_header, "other-model", {"x-user-id": "u-7"}) is None
    by_cookie = gateway("cookie:session")
    assert stickiness_key(by_cookie, "m", {"cookie": "theme=dark; session=s9"}) == "s9"
    assert stickiness_key(by_cookie, "m", {"cookie": "theme=dark"}) is None
    assert stickiness_key(by_cookie, "m", {"cookie": 'session="s9"'}) == "s9"  # unquoted
    assert stickiness_key(by_cookie, "m", {"cookie": "xsession=1; session=; a=b"}) is None


@pytest.mark.parametrize(
    "other",
    ['other={"x":1}', "other=a b", "uid=ü", "flag", "=", "a=b=c", 'q="unterminated', ";;"],
)
def test_another_cookie_the_standard_parser_refuses_hides_no_key(other: str) -> None:
    """Found by an adversarial probe: http.cookies stopped at such a cookie, before or
    after the key's, and the user fell to the random split."""
    from rollguard.proxy.routing import cookie_value

    assert cookie_value(f"{other}; session=s9", "session") == "s9"
    assert cookie_value(f"session=s9; {other}", "session") == "s9"
    assert cookie_value(f"session=ü; {other}", "session") == "ü"


@given(st.text(alphabet=st.characters(exclude_characters=";"), max_size=30), keys)
def test_a_cookie_key_is_found_whatever_precedes_it(junk: str, key: str) -> None:
    from rollguard.proxy.routing import cookie_value

    value = key.strip().replace(";", "")
    assume(value and '"' not in value and not junk.strip().startswith("session="))
    assume(junk.partition("=")[0].strip() != "session")
    assert cookie_value(f"{junk}; session={value}", "session") == value


@given(keys, weights)
def test_a_failed_over_table_still_picks_the_candidate_by_key(key: str, weight: float) -> None:
    """Failover changes who answers, not the split: a key keeps its bucket, so it comes
    back to the candidate when the candidate can take traffic again."""
    table = canary(weight)
    failed = dataclasses.replace(table, failover="refused")
    assert failed != table and failed.choose(key) == table.choose(key)
