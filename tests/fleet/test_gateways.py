"""Fleet mode end to end: a real redis-server and three `rollguard serve` processes on
loopback sharing one rollout through it (`state: redis://...`), traffic spread over them."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from load_tests.redis_server import RedisServer
from rollguard.policy.chain import RECORD_KINDS
from rollguard.proxy.fleet.store import PREFIX
from rollguard.proxy.process import GatewayProcess
from tests.fleet.support import (
    ROW,
    admin_get,
    assert_no_traceback,
    audit_entries,
    canary_policy,
    rollout_policy,
    serve_env,
    until,
    upstream,
    write_policy,
)

pytestmark = pytest.mark.slow

POLICY = canary_policy("0.5s")


async def _verify(redis_server: RedisServer) -> subprocess.CompletedProcess[str]:
    """`rollguard audit verify --state redis://...`, as a user runs it."""
    command = [sys.executable, "-m", "rollguard.proxy.cli", "audit", "verify"]
    return await asyncio.to_thread(
        subprocess.run,
        [*command, "--state", redis_server.url],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "ROLLGUARD_AUDIT_KEY"},
        timeout=60,
    )


async def _rollout(http: aiohttp.ClientSession, gateway: GatewayProcess) -> dict[str, Any]:
    doc: dict[str, Any] = await admin_get(http, f"{gateway.admin_url}/admin/rollouts/remote")
    return doc


async def _overview(http: aiohttp.ClientSession, gateway: GatewayProcess) -> dict[str, Any]:
    doc: dict[str, Any] = await admin_get(http, f"{gateway.admin_url}/admin/rollouts")
    return doc


async def _drive(
    http: aiohttp.ClientSession,
    gateways: list[GatewayProcess],
    stop: asyncio.Event,
    served: dict[str, int] | None = None,
) -> dict[str, int]:
    """Round-robin requests over `gateways` (a list the caller may change) until `stop`;
    answers per variant, counted into `served` as they come (a caller may watch it)."""
    served = {} if served is None else served
    turn = itertools.count()

    async def worker() -> None:
        while not stop.is_set():
            gateway = gateways[next(turn) % len(gateways)]
            url = f"{gateway.url}/v2/models/remote/infer"
            headers = {"content-type": "application/json"}
            try:
                async with http.post(url, data=ROW, headers=headers) as r:
                    await r.read()
                    variant = r.headers.get("x-rollguard-variant", "?")
                    if r.status != 200:
                        served["failed"] = served.get("failed", 0) + 1
            except aiohttp.ClientError:  # in flight to a gateway that was just killed
                variant = "lost"
            served[variant] = served.get(variant, 0) + 1

    await asyncio.gather(*(worker() for _ in range(6)))
    return served


@asynccontextmanager
async def _fleet(
    tmp_path: Path, redis_server: RedisServer, count: int, *, policy: str = POLICY
) -> AsyncIterator[list[GatewayProcess]]:
    registry, policies = tmp_path / "registry", write_policy(tmp_path, policy)
    env = serve_env({"ROLLGUARD_GRPC_ENABLED": "false"})
    gateways: list[GatewayProcess] = []
    try:
        for i in range(count):
            gateways.append(
                GatewayProcess(
                    registry=registry,
                    policies=policies,
                    state=redis_server.url,
                    log=tmp_path / f"gateway-{i}.log",
                    env=env,
                )
            )
        async with aiohttp.ClientSession() as http:
            for gateway in gateways:
                await gateway.wait_ready(http)
        yield gateways
    finally:
        for gateway in gateways:
            gateway.stop()
    for i in range(count):
        assert_no_traceback(tmp_path / f"gateway-{i}.log")


async def test_three_gateways_roll_a_failing_candidate_back_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    registry = tmp_path / "registry"
    async with (
        upstream(registry, failing={"2"}),
        _fleet(tmp_path, redis_server, 3) as gateways,
        aiohttp.ClientSession() as http,
    ):
        # One decider: the others follow the state it wrote.
        seen: list[Any] = []

        async def began() -> bool:
            seen[:] = [await _rollout(http, g) for g in gateways]
            return all(d["phase"] == "progressing" and d["weight"] == 30 for d in seen)

        try:
            await until(began, 20.0)
        except TimeoutError:
            raise AssertionError([(d["phase"], d["weight"], d["reason"]) for d in seen]) from None
        stop = asyncio.Event()
        driving = asyncio.create_task(_drive(http, gateways, stop))
        rolled_back: dict[int, float] = {}

        async def all_rolled_back() -> bool:
            for i, gateway in enumerate(gateways):
                if i not in rolled_back:
                    doc = await _rollout(http, gateway)
                    if doc["phase"] == "rolled_back" and doc["weight"] == 0:
                        rolled_back[i] = time.time()  # wall clock: compared with the entry's ts
            return len(rolled_back) == len(gateways)

        try:
            await until(all_rolled_back, 60.0)
        finally:
            stop.set()
            served = await driving
        assert served.get("2", 0) > 0, served
        # Every gateway now sends every request to stable.
        for gateway in gateways:
            for _ in range(20):
                url = f"{gateway.url}/v2/models/remote/infer"
                async with http.post(url, data=ROW) as r:
                    assert r.status == 200 and r.headers["x-rollguard-variant"] == "1"
        deciders = [
            g for g in gateways if "remote" in (await _overview(http, g))["fleet"]["deciding"]
        ]
        assert len(deciders) == 1
        # The audit stream: exactly one rollback, and the chain verifies.
        entries = await audit_entries(redis_server)
        rollbacks = [
            e for e in entries if e["kind"] == "decision" and e["data"]["action"] == "rollback"
        ]
        assert len(rollbacks) == 1, [(e["kind"], e["data"].get("action")) for e in entries]
        # Within 1 s of the rollback being written, all three route 100 % to stable.
        written = datetime.fromisoformat(rollbacks[0]["ts"]).timestamp()
        after = max(rolled_back.values()) - written
        print(f"\nall three stable-only {after:.3f}s after the rollback was written; {served}")
        assert after < 1.0, after
        starts = [e for e in entries if e["kind"] == "start"]
        assert len(starts) == 1
        # The admin API of any process reads the same stream.
        async with http.get(
            f"{gateways[2].admin_url}/admin/audit", headers=gateways[2].admin_headers
        ) as r:
            assert r.status == 200
            assert len((await r.json())["entries"]) == len(entries)
    verified = await _verify(redis_server)
    assert verified.returncode == 0, verified.stderr
    assert "chain intact" in verified.stdout


STEPPED = rollout_policy("{weight: 20, hold: 0.5s}", "{weight: 50, hold: 8s}", "{weight: 100}")


async def test_a_killed_decider_is_replaced_within_the_lease_and_the_rollout_continues(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    registry = tmp_path / "registry"
    async with (
        upstream(registry),
        _fleet(tmp_path, redis_server, 3, policy=STEPPED) as gateways,
        aiohttp.ClientSession() as http,
    ):

        async def at_second_step() -> bool:
            docs = [await _rollout(http, g) for g in gateways]
            return all(d["step"] == 1 and d["weight"] == 50 for d in docs)

        stop = asyncio.Event()
        alive = list(gateways)
        driving = asyncio.create_task(_drive(http, alive, stop))
        await until(at_second_step, 20.0)
        deciders = [
            g for g in gateways if "remote" in (await _overview(http, g))["fleet"]["deciding"]
        ]
        assert len(deciders) == 1
        killed = deciders[0]
        alive.remove(killed)  # no more requests to it (none in flight is asked to finish)
        killed.kill()
        killed_at = time.monotonic()
        taken_over: list[GatewayProcess] = []

        async def another_decides() -> bool:
            taken_over[:] = [
                g for g in alive if "remote" in (await _overview(http, g))["fleet"]["deciding"]
            ]
            return bool(taken_over)

        try:
            await until(another_decides, 10.0)
            handover = time.monotonic() - killed_at
            doc = await _rollout(http, taken_over[0])
            # The same step, not a new rollout: the hold of step 2 goes on.
            assert (doc["step"], doc["weight"], doc["generation"]) == (1, 50, 1), doc

            async def promoted() -> bool:
                docs = [await _rollout(http, g) for g in alive]
                return all(d["phase"] == "promoted" for d in docs)

            await until(promoted, 30.0)
        finally:
            stop.set()
            served = await driving
        print(f"\nhanded over {handover:.2f}s after SIGKILL (lease 5 s); served {served}")
        assert len(taken_over) == 1
        assert handover < 5.0 + 1.0  # the lease time, and a renewal period of slack
        entries = await audit_entries(redis_server)
        decisions = [
            (e["data"]["action"], e["data"]["state"]["step"], e["data"]["state"]["phase"])
            for e in entries
            if e["kind"] == "decision"
        ]
        # Every step forward once: none lost, none doubled by the two deciders.
        assert len(decisions) == len(set(decisions)), decisions
        assert decisions == [
            ("advance", 1, "progressing"),
            ("advance", 2, "progressing"),
            ("promote", 2, "promoted"),
        ]
        assert [e["kind"] for e in entries].count("restore") == 1
    verified = await _verify(redis_server)
    assert verified.returncode == 0, verified.stderr


async def test_a_decider_killed_between_its_entry_and_its_save_is_recovered_from_the_stream(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The stream is the fleet's source of truth. A decider appends a decision's entry,
    then saves the state it names; killed between the two, redis keeps the older state.
    The crash is reproduced with real writes: the state hash as it was before the advance
    is put back after the decider wrote the advance's entry and state and was killed. The
    next decider takes the state from the stream and records that it did."""
    registry = tmp_path / "registry"
    state_key = f"{PREFIX}:state:remote"
    client = redis_server.target.client()
    async with upstream(registry), aiohttp.ClientSession() as http, aclosing(client):
        waits = HELD.replace("hold: 0.5s}", "hold: 0.5s, min_requests: 30}")  # for traffic
        async with _fleet(tmp_path, redis_server, 1, policy=waits) as (first,):

            async def at_step(step: int) -> bool:
                return bool((await _rollout(http, first))["step"] == step)

            async def started() -> bool:
                return bool(await client.exists(state_key)) and await at_step(0)

            await until(started, 20.0)
            before: dict[Any, Any] = await client.hgetall(state_key)  # the start's save
            assert orjson.loads(before[b"doc"])["state"]["step"] == 0
            stop = asyncio.Event()
            driving = asyncio.create_task(_drive(http, [first], stop))
            try:
                await until(lambda: at_step(1), 20.0)  # the advance: entry, then state
            finally:
                stop.set()
                await driving
            first.kill()
        await client.delete(state_key)
        await client.hset(state_key, mapping=before)  # the advance's save never landed
        second = GatewayProcess(
            registry=registry,
            policies=tmp_path / "policies",
            state=redis_server.url,
            log=tmp_path / "second.log",
            env=serve_env({"ROLLGUARD_GRPC_ENABLED": "false"}),
        )
        try:
            await second.wait_ready(http)

            async def took_over() -> bool:  # its `restore` entry: the takeover is done
                return any(e["kind"] == "restore" for e in await audit_entries(redis_server))

            await until(took_over, 15.0)  # after the killed decider's lease (5 s) ran out
            doc = await _rollout(http, second)
            # Step 2 (weight 50) as the stream says, not step 1 as the stale state did.
            assert (doc["step"], doc["weight"]) == (1, 50), doc
        finally:
            second.stop()
        saved = await _saved_state(redis_server)
    entries = await audit_entries(redis_server)
    records = [e["seq"] for e in entries if e["kind"] in RECORD_KINDS]
    assert saved["audit_seq"] == records[-1]  # the next takeover finds them agreeing
    assert_no_traceback(tmp_path / "second.log")
    recovered = [e for e in entries if e["kind"] == "state_recovered"]
    assert len(recovered) == 1, [e["kind"] for e in entries]
    assert "rebuilt from audit entry" in recovered[0]["data"]["reason"]
    assert recovered[0]["data"]["state"]["step"] == 1
    advances = [e for e in entries if e["kind"] == "decision"]
    assert [(e["data"]["action"], e["data"]["state"]["step"]) for e in advances] == [("advance", 1)]
    verified = await _verify(redis_server)
    assert verified.returncode == 0, verified.stderr


async def _saved_state(redis_server: RedisServer) -> dict[str, Any]:
    """The rollout's state document as redis holds it (`audit_seq`, `state`, ...)."""
    client = redis_server.target.client()
    try:
        raw = await client.hget(f"{PREFIX}:state:remote", "doc")
        assert raw is not None, "no state saved"
        doc: dict[str, Any] = orjson.loads(raw)
        return doc
    finally:
        await client.aclose()


OUTAGE_S = 10.0
HELD = STEPPED.replace("{weight: 50, hold: 8s}", "{weight: 50, hold: 600s}")


@pytest.mark.parametrize("persist", [True, False], ids=["kept-its-data", "lost-its-data"])
async def test_redis_stopped_mid_rollout_keeps_the_weights_and_decisions_resume_after(
    tmp_path: Path, redis_server: RedisServer, persist: bool
) -> None:
    """Redis down for 10 s: requests never fail, weights stay, nobody decides. Back (with its data,
    or without it: then the decider writes back the state it knew), one decider again,
    at the same step."""
    registry = tmp_path / "registry"
    async with (
        upstream(registry),
        _fleet(tmp_path, redis_server, 2, policy=HELD) as gateways,
        aiohttp.ClientSession() as http,
    ):

        async def fleet_status() -> list[dict[str, Any]]:
            return [(await _overview(http, g))["fleet"] for g in gateways]

        async def at_second_step() -> bool:
            docs = [await _rollout(http, g) for g in gateways]
            return all(d["step"] == 1 and d["weight"] == 50 for d in docs)

        stop = asyncio.Event()
        counts: dict[str, int] = {}
        driving = asyncio.create_task(_drive(http, gateways, stop, counts))
        try:
            await until(at_second_step, 20.0)
            redis_server.stop()
            stopped_at, answered = time.monotonic(), sum(counts.values())

            async def nobody_decides() -> bool:
                found = await fleet_status()
                return all(f["redis"] == "unavailable" and not f["deciding"] for f in found)

            # Until every process has said so and the decider's lease has lapsed by its clock.
            await until(nobody_decides, 15.0)
            for gateway in gateways:
                doc = await _rollout(http, gateway)
                assert (doc["phase"], doc["step"], doc["weight"]) == ("progressing", 1, 50)
                async with http.get(f"{gateway.admin_url}/metrics") as r:
                    assert "rollguard_fleet_redis_up 0.0" in await r.text()
                # Still ready (it serves, on the last weights), and it says why nothing moves.
                async with http.get(f"{gateway.url}/v2/health/ready") as r:
                    assert r.status == 200
                    assert await r.json() == {
                        "ready": True,
                        "fleet": {"redis": "unavailable", "deciding": []},
                    }

            async def outage_lasted() -> bool:
                # The outage is 10 s long, with traffic served all through it.
                return time.monotonic() - stopped_at >= OUTAGE_S and (
                    sum(counts.values()) - answered >= 200
                )

            await until(outage_lasted, OUTAGE_S + 20.0)
            for gateway in gateways:
                doc = await _rollout(http, gateway)
                assert (doc["phase"], doc["step"], doc["weight"]) == ("progressing", 1, 50)
            redis_server.start(persist=persist)  # no append-only file read: data lost

            async def resumed() -> bool:
                found = await fleet_status()
                deciding = [f for f in found if "remote" in f["deciding"]]
                return all(f["redis"] == "up" for f in found) and len(deciding) == 1

            await until(resumed, 15.0)
            docs = [await _rollout(http, g) for g in gateways]
            assert {(d["step"], d["weight"], d["generation"]) for d in docs} == {(1, 50, 1)}
        finally:
            stop.set()
            served = await driving
        print(f"\nserved through the outage: {served}")
        assert "failed" not in served and "lost" not in served, served
        entries = await audit_entries(redis_server)
        decisions = [e["data"]["action"] for e in entries if e["kind"] == "decision"]
        # A Redis that lost its data lost the stream's history with it (its durability
        # is Redis's appendonly setting); the chain it holds from then on verifies.
        assert decisions == (["advance"] if persist else []), decisions
    verified = await _verify(redis_server)
    assert verified.returncode == 0, verified.stderr


async def test_an_operator_and_a_policy_edit_act_once_through_any_process(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A rollback asked of a follower and a step-weight edit read by every process: each
    written once (one audit entry), and every process routes by it."""
    registry = tmp_path / "registry"
    async with (
        upstream(registry),
        _fleet(tmp_path, redis_server, 2, policy=HELD) as gateways,
        aiohttp.ClientSession() as http,
    ):

        async def weights(expected: float) -> bool:
            docs = [await _rollout(http, g) for g in gateways]
            return all(d["step"] == 1 and d["weight"] == expected for d in docs)

        stop = asyncio.Event()
        driving = asyncio.create_task(_drive(http, gateways, stop))
        try:
            await until(lambda: weights(50), 20.0)
            policy = tmp_path / "policies" / "remote.yaml"
            policy.write_text(HELD.replace("{weight: 50, hold: 600s}", "{weight: 60, hold: 600s}"))
            await until(lambda: weights(60), 15.0)
            deciding = [
                g for g in gateways if "remote" in (await _overview(http, g))["fleet"]["deciding"]
            ]
            follower = next(g for g in gateways if g not in deciding)
            url = f"{follower.admin_url}/admin/rollouts/remote/rollback"
            body = {"actor": "ops", "reason": "fleet test"}
            async with http.post(url, json=body, headers=follower.admin_headers) as r:
                assert r.status == 200, await r.text()

            async def rolled_back() -> bool:
                docs = [await _rollout(http, g) for g in gateways]
                return all(d["phase"] == "rolled_back" and d["weight"] == 0 for d in docs)

            await until(rolled_back, 2.0)
        finally:
            stop.set()
            await driving
        entries = await audit_entries(redis_server)
        kinds = [e["kind"] for e in entries]
        assert kinds.count("policy") == 1 and kinds.count("admin") == 1, kinds
        # The policy file as both processes first read it, and its edit: once each.
        applied = [e["data"]["changed"] for e in entries if e["kind"] == "policy_applied"]
        assert len(applied) == 2 and applied[1] != [], applied
        admin = next(e for e in entries if e["kind"] == "admin")
        assert (admin["actor"], admin["data"]["action"], admin["data"]["note"]) == (
            "ops",
            "rollback",
            "fleet test",
        )
        # The decider, told by redis, did not decide anything after the operator.
        assert kinds[-1] == "admin", kinds
        # The state the follower saved names the operator's entry (its takeover check).
        saved = await _saved_state(redis_server)
        assert saved["audit_seq"] == admin["seq"], (saved["audit_seq"], admin["seq"])
    verified = await _verify(redis_server)
    assert verified.returncode == 0, verified.stderr
