"""`rollguard audit verify|export --state redis://...`: the CLI's audit commands on a fleet.

proxy/cli.py hands its parsed arguments here when --state is a Redis URL; the output
and exit codes match the file log's commands (one line on stderr and exit 1 on failure).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from rollguard.policy.chain import VerifyResult
from rollguard.policy.errors import PolicyError
from rollguard.policy.keys import load_key
from rollguard.proxy.fleet.audit import RedisAuditLog
from rollguard.proxy.fleet.connection import RedisTarget
from rollguard.proxy.fleet.errors import FleetError


def audit_command(args: argparse.Namespace) -> int:
    """Run `audit verify` or `audit export` against the audit stream at args.state."""
    try:
        done = asyncio.run(_run(args))
    except (FleetError, PolicyError) as exc:
        print(f"rollguard: {exc}", file=sys.stderr)
        return 1
    if isinstance(done, int):
        return done
    if args.output:
        Path(args.output).write_text(done, encoding="utf-8")
    else:
        sys.stdout.write(done)
    return 0


async def _run(args: argparse.Namespace) -> int | str:
    """verify's exit code, or export's text."""
    target = RedisTarget.parse(str(args.state))
    if args.audit_command == "adopt-key":
        print(
            f"rollguard: {target.display}: adopt-key is for a file log; a fleet's audit stream "
            "is keyed from its first entry (set ROLLGUARD_AUDIT_KEY on every process)",
            file=sys.stderr,
        )
        return 1
    key = None
    if args.audit_command == "verify":
        key_file = Path(args.key_file) if args.key_file else None
        # No state directory to keep the key file out of: the state is in Redis.
        key = load_key(os.environ.get("ROLLGUARD_AUDIT_KEY"), key_file, Path(os.devnull))
    client = target.client(name="rollguard-audit-cli")
    try:
        stream = RedisAuditLog(client, target, key=key)
        if args.audit_command == "verify":
            return _report(target, stream, await stream.verify())
        return await stream.export(since=args.since, until=args.until, fmt=args.format)
    finally:
        await client.aclose()


def _report(target: RedisTarget, stream: RedisAuditLog, result: VerifyResult) -> int:
    where = f"audit stream {stream.stream} at {target.display}"
    if not result.ok:
        at = f"entry {result.first_bad_line}" if result.first_bad_line else "its head"
        print(f"rollguard: {where} fails at {at}: {result.reason}", file=sys.stderr)
        return 1
    if stream.key is not None:
        key_id = stream.key.id
        print(f"{where}: {result.entries} entries, chain intact, sealed with audit key {key_id}")
    else:
        print(
            f"{where}: {result.entries} entries, chain intact but UNKEYED: a plain sha256 chain "
            "that anyone who can write to Redis can rewrite undetected; set ROLLGUARD_AUDIT_KEY"
        )
    return 0
