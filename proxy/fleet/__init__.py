"""Fleet mode: many rollguard processes sharing one rollout's state through Redis.

- connection.py  the `state: redis://` target and the one translation of Redis faults
- store.py       rollout state with a version number, written by compare-and-set
- lease.py       one decider per rollout (SET NX PX, renewed), fencing its writes
- follow.py      followers apply every state change (pub/sub plus a periodic re-read)
- evidence.py    per-process window summaries (policy/summary.py) published and merged
- audit.py       the hash-chained audit log as a Redis stream, and its verification

Every call that needs Redis raises FleetUnavailable when Redis cannot answer, so the
gateway can keep routing on the last weights it knew (errors.py draws the tree).
"""
