"""Driving wrk: a Lua script that posts the V2 body with varied user keys and reports as JSON."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from load_tests.bench.client import LoadResult

_MARK = "BENCH_JSON "

# 1024 prebuilt requests, each with its own x-user-id, cycled: the hash split sees many
# users while wrk spends no Lua time building requests.
_SCRIPT = """
local body = [==[%(body)s]==]
local path = "%(path)s"
local reqs = {}
local n = 0
local i = 0
init = function(args)
  for k = 1, 1024 do
    local headers = {}
    headers["Content-Type"] = "application/json"
    headers["%(key)s"] = "user-" .. math.random(1, 100000000)
    reqs[k] = wrk.format("POST", path, headers, body)
  end
  n = 1024
end
request = function()
  i = i %% n + 1
  return reqs[i]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50":%%d,"p95":%%d,"p99":%%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def lua_script(body: bytes, path: str, key_header: str) -> str:
    text = body.decode()
    if "]==]" in text:
        raise ValueError("the request body cannot be embedded in a Lua long string")
    return _SCRIPT % {"body": text, "path": path, "key": key_header, "mark": _MARK}


def parse(output: str) -> LoadResult:
    """The JSON line the script's done() wrote; LoadResult counts only 2xx as answered."""
    line = next((ln for ln in output.splitlines() if ln.startswith(_MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{output[-2000:]}")
    r = json.loads(line[len(_MARK) :])
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return LoadResult(
        requests=max(r["requests"] - r["status"], 0),
        errors=errors,
        duration_s=r["duration_us"] / 1e6,
        p50_ms=r["p50"] / 1000,
        p95_ms=r["p95"] / 1000,
        p99_ms=r["p99"] / 1000,
        client="wrk",
    )


def run(
    wrk: str,
    url: str,
    body: bytes,
    *,
    key_header: str,
    connections: int,
    threads: int,
    duration_s: float,
) -> LoadResult:
    """One wrk run against `url` (scheme://host:port/path)."""
    scheme_host, _, path = url.partition("//")[2].partition("/")
    base = url[: url.index(scheme_host) + len(scheme_host)]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua_script(body, "/" + path, key_header))
    try:
        done = subprocess.run(
            [
                wrk,
                f"-t{threads}",
                f"-c{connections}",
                f"-d{duration_s:g}s",
                "--timeout",
                "5s",
                "-s",
                script.name,
                base,
            ],
            capture_output=True,
            text=True,
            timeout=duration_s + 30,
            check=False,
        )
    finally:
        Path(script.name).unlink(missing_ok=True)
    return parse(done.stdout + done.stderr)
