"""Micro-benchmark of the gateway's per-request bookkeeping: key, route, record, index.

Run `python load_tests/bench_hotpath.py`; prints nanoseconds per request for hash and
random splits, in total and per step (the target is under 5 µs in total).
"""

from __future__ import annotations

import argparse
import random
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollguard.proxy.feedback import FeedbackIndex
from rollguard.proxy.routing import KeySource, Router, SplitTable, stickiness_key
from rollguard.proxy.windows import Outcome, VariantWindow

N_KEYS = 4096  # distinct users and request ids cycled through (a power of two for masking)


def _best_ns(stmt: Callable[[], None], loops: int, repeat: int) -> float:
    """Best-of-`repeat` nanoseconds per loop: the least disturbed run on a shared box."""
    return min(timeit.repeat(stmt, number=1, repeat=repeat)) / loops * 1e9


def bench(split: str, loops: int, repeat: int) -> dict[str, float]:
    rng = random.Random(1)
    source = KeySource.parse("header:x-user-id")
    table = SplitTable(
        model="fraud",
        stable="1.0.0",
        candidate="1.1.0",
        weight=10.0,
        split="hash" if split == "hash" else "random",
        key_source=source,
        rng=rng,
    )
    router = Router([table])
    windows = {v: VariantWindow(v, 2000) for v in ("1.0.0", "1.1.0")}
    index = FeedbackIndex(100_000, 86_400.0)
    # The data port's parser hands over headers keyed by lower-case name (proxy/protocol.py).
    headers = [{"x-user-id": f"user-{rng.getrandbits(48):x}"} for _ in range(N_KEYS)]
    ids = [f"{rng.getrandbits(128):032x}" for _ in range(N_KEYS)]
    keys = [stickiness_key(router, "fraud", h) for h in headers]
    mask = N_KEYS - 1
    ok = Outcome.OK

    def full() -> None:
        choose, put = table.choose, index.put
        for i in range(loops):
            j = i & mask
            version, _role = choose(stickiness_key(router, "fraud", headers[j]))
            window = windows[version]
            window.count_routed()
            window.record(0.0012, ok)
            put("fraud", None, ids[j], window, (1.0,))

    def extract_only() -> None:
        for i in range(loops):
            stickiness_key(router, "fraud", headers[i & mask])

    def choose_only() -> None:
        choose = table.choose
        for i in range(loops):
            choose(keys[i & mask])

    def record_only() -> None:
        record = windows["1.0.0"].record
        for _ in range(loops):
            record(0.0012, ok)

    def put_only() -> None:
        put, window = index.put, windows["1.0.0"]
        for i in range(loops):
            put("fraud", None, ids[i & mask], window, (1.0,))

    def empty_loop() -> None:
        for i in range(loops):
            i & mask  # the loop's own cost, subtracted below

    base = _best_ns(empty_loop, loops, repeat)
    steps = {
        "extract": extract_only,
        "choose": choose_only,
        "record": record_only,
        "put": put_only,
        "total": full,
    }
    return {name: _best_ns(fn, loops, repeat) - base for name, fn in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {args.loops} requests x best of {args.repeat}")
    print(f"{'split':<8}{'extract':>9}{'choose':>9}{'record':>9}{'put':>9}{'total':>9}  (ns)")
    for split in ("hash", "random"):
        r = bench(split, args.loops, args.repeat)
        print(
            f"{split:<8}{r['extract']:>9.0f}{r['choose']:>9.0f}{r['record']:>9.0f}"
            f"{r['put']:>9.0f}{r['total']:>9.0f}"
        )


if __name__ == "__main__":
    main()
