"""The results: per-target medians over rounds, ratios to bare, the issue's targets, the machine."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

FIGURES = ("rps", "p50_ms", "p95_ms", "p99_ms", "cpu_s_per_1k")
# Targets serving another model under another load than bare: their ×bare cells stay empty.
NOT_COMPARABLE_TO_BARE = frozenset({"rollguard-mlp", "rollguard-mlp-batched"})
_LIBS = ("aiohttp", "uvloop", "orjson", "onnxruntime", "numpy", "scikit-learn", "prometheus-client")


@dataclass
class Row:
    """One target's runs; its figures are medians over rounds."""

    target: str
    about: str
    runs: list[dict[str, float]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def figure(self, name: str) -> float:
        values = [v for r in self.runs if (v := r.get(name, float("nan"))) == v]  # NaN-free
        return statistics.median(values) if values else float("nan")

    @property
    def errors(self) -> int:
        return int(sum(r["errors"] for r in self.runs))


@dataclass(frozen=True, slots=True)
class Goal:
    """A target from the issue: `target`'s `figure` over `baseline`'s, at least or at most."""

    label: str
    target: str
    baseline: str
    figure: str
    bound: float | None  # None: a reference figure, printed but not judged
    at_least: bool = True
    # The two targets run next to each other in a round (targets.ALL); False for the
    # goals against a peer that three others are also judged against (nginx, MLServer).
    adjacent: bool = True

    def check(self, rows: dict[str, Row]) -> dict[str, Any] | None:
        if self.target not in rows or self.baseline not in rows:
            return None
        target, baseline = rows[self.target], rows[self.baseline]
        if not all(self.figure in r for r in target.runs + baseline.runs):
            return None  # a figure only some runs have (shadow counts of an older run)
        of_medians = target.figure(self.figure) / baseline.figure(self.figure)
        # Rounds are interleaved: round i of both ran closer together than round i of
        # one and round j of the other, so the ratio is taken within each round and the
        # goal judged on their median. A shared machine's speed drifts between rounds
        # (bare alone moves by a quarter), which a ratio of medians would mix in.
        per_round = [
            t[self.figure] / b[self.figure]
            for t, b in zip(target.runs, baseline.runs, strict=False)
            if b[self.figure] > 0
        ]
        ratio = statistics.median(per_round) if per_round else of_medians
        found = {
            "goal": self.label,
            "ratio": ratio,
            "per_round": per_round,
            "ratio_of_medians": of_medians,
        }
        if self.bound is None:
            return {**found, "met": None, "gap_percent": None}
        met = ratio >= self.bound if self.at_least else ratio <= self.bound
        gap = (ratio / self.bound - 1) * 100
        return {**found, "met": met, "gap_percent": gap}


GOALS = (
    Goal(
        "rollguard in-process, canary: throughput >= 1.0 x bare",
        "rollguard",
        "bare",
        "rps",
        1.0,
        True,
    ),
    Goal(
        "rollguard in-process, canary: p99 <= 1.2 x bare", "rollguard", "bare", "p99_ms", 1.2, False
    ),
    Goal(
        "rollguard proxy: throughput >= 0.8 x direct to upstream",
        "rollguard-proxy",
        "bare",
        "rps",
        0.8,
        True,
    ),
    Goal(
        "rollguard in-process, canary: throughput >= 8 x MLServer",
        "rollguard",
        "mlserver",
        "rps",
        8.0,
        True,
        adjacent=False,
    ),
    Goal(
        "rollguard proxy: throughput >= 0.85 x nginx proxy (one worker each)",
        "rollguard-proxy",
        "nginx-proxy",
        "rps",
        0.85,
        True,
        adjacent=False,
    ),
    Goal(
        "rollguard proxy: throughput >= 1.5 x naive aiohttp proxy",
        "rollguard-proxy",
        "naive-proxy",
        "rps",
        1.5,
        True,
    ),
    Goal(
        "shadow 100% at saturation: compared answers/s (in-process) >= nginx mirror's",
        "rollguard-shadow",
        "nginx-mirror",
        "compared_per_s",
        1.0,
        True,
        adjacent=False,
    ),
    Goal(
        "shadow 100% at saturation: compared answers/s (proxy) >= nginx mirror's",
        "rollguard-proxy-shadow",
        "nginx-mirror",
        "compared_per_s",
        1.0,
        True,
        adjacent=False,
    ),
    # What mirroring every copy costs at saturation (shed only under pressure, then half).
    Goal(
        "reference: shadow 100% (proxy) throughput / no shadow",
        "rollguard-proxy-shadow",
        "rollguard-proxy",
        "rps",
        None,
    ),
    Goal(
        "reference: shadow 100% (in-process) throughput / canary, no shadow",
        "rollguard-shadow",
        "rollguard",
        "rps",
        None,
    ),
    Goal(
        "reference: nginx mirror throughput / nginx proxy",
        "nginx-mirror",
        "nginx-proxy",
        "rps",
        None,
    ),
    Goal("reference: naive aiohttp proxy / bare", "naive-proxy", "bare", "rps", None),
    # One row a request: rows/s is req/s.
    Goal(
        "micro-batching over HTTP, 64 connections: rows/s >= 2 x unbatched",
        "rollguard-mlp-batched",
        "rollguard-mlp",
        "rps",
        2.0,
        True,
    ),
    Goal(
        "micro-batching over HTTP, 64 connections: p99 batched <= unbatched",
        "rollguard-mlp-batched",
        "rollguard-mlp",
        "p99_ms",
        1.0,
        False,
    ),
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _commit() -> str:
    """The checked-out commit, "+ local changes" when the work tree differs from it."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} + local changes" if dirty else head


def machine(tools: dict[str, str]) -> dict[str, Any]:
    libs = {}
    for lib in _LIBS:
        try:
            libs[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            libs[lib] = "missing"
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(_mem_gib(), 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "libraries": libs,
        "tools": tools,
    }


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if value != value else f"{value:,.{digits}f}"


def table(rows: list[Row]) -> str:
    """The markdown table: absolute figures, then each as a ratio to bare (where comparable)."""
    bare = next((r for r in rows if r.target == "bare"), None)
    head = "| target | req/s | p50 ms | p95 ms | p99 ms | CPU s/1k req | errors |"
    head += " req/s ×bare | p50 ×bare | p95 ×bare | p99 ×bare | CPU ×bare |"
    mirrors = any("mirrored_share" in run for r in rows for run in r.runs)
    if mirrors:
        head += " mirrored | compared/s |"
    lines = [head, "|" + "---|" * (14 if mirrors else 12)]
    for row in rows:
        cells = [row.target, _fmt(row.figure("rps"), 0)]
        cells += [_fmt(row.figure(f)) for f in ("p50_ms", "p95_ms", "p99_ms")]
        cells += [_fmt(row.figure("cpu_s_per_1k"), 3), str(row.errors)]
        for f in FIGURES:
            base = bare.figure(f) if bare else float("nan")
            comparable = bool(base) and row.target not in NOT_COMPARABLE_TO_BARE
            cells.append(_fmt(row.figure(f) / base) if comparable else "—")
        if mirrors:
            share = row.figure("mirrored_share")
            cells.append("—" if share != share else f"{share:.1%}")
            cells.append(_fmt(row.figure("compared_per_s"), 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _state(notes: dict[str, Any]) -> str:
    """What rollguard reported after the runs: rollout phase and weight, shadow results."""
    parts = []
    if "rollout" in notes:
        parts.append(
            f"rollout {notes['rollout']['phase']} at weight {notes['rollout']['weight']:g}%"
        )
    if "shadow_requests" in notes:
        counts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(notes["shadow_requests"].items()))
        parts.append(f"shadow copies {counts}")
    return f" (after the runs: {'; '.join(parts)})" if parts else ""


def _order(settings: dict[str, Any]) -> str:
    """How rounds ordered the targets (runs before the order alternated do not say)."""
    return ", every other one in reverse order" if settings.get("order") == "alternating" else ""


def _other_load(rows: list[Row], settings: dict[str, Any]) -> str:
    """The header's word on the targets that do not get the common body and connections."""
    other = [r for r in rows if r.target in NOT_COMPARABLE_TO_BARE]
    if not other:
        return ""
    counts = sorted(
        {int(run.get("connections", settings["connections"])) for r in other for run in r.runs}
    )
    names = " and ".join(r.target for r in other)
    return (
        f" Except {names}: a wide MLP, one load_digits row a request, at "
        f"{' / '.join(str(c) for c in counts)} connections."
    )


def goals(rows: list[Row]) -> list[dict[str, Any]]:
    by_name = {r.target: r for r in rows}
    return [c for g in GOALS if (c := g.check(by_name)) is not None]


def goal_lines(checked: list[dict[str, Any]]) -> list[str]:
    lines = []
    for c in checked:
        rounds = c.get("per_round") or []
        spread = (
            f" (rounds {min(rounds):.2f}–{max(rounds):.2f}; "
            f"ratio of the table's medians {c['ratio_of_medians']:.2f})"
            if len(rounds) > 1
            else ""
        )
        if c["met"] is None:
            lines.append(f"- {c['goal']}: {c['ratio']:.2f}{spread}")
            continue
        gap = abs(c["gap_percent"])
        verdict = "met" if c["met"] else f"MISSED by {gap:.0f}%" if gap >= 0.5 else "MISSED"
        # A ratio just under its goal would print as the goal itself at two places.
        ratio = f"{c['ratio']:.2f}" if c["met"] or gap >= 0.5 else f"{c['ratio']:.3f}"
        lines.append(f"- {c['goal']}: {ratio}{spread} — {verdict}")
    return lines


NOTES = "## Notes"


def kept_notes(md_path: Path) -> str:
    """The hand-written '## Notes' section of the previous bench.md, kept across runs."""
    try:
        text = md_path.read_text(encoding="utf-8")
    except OSError:
        return ""
    start = text.find(NOTES)
    return "\n" + text[start:] if start >= 0 else ""


def write(
    out: Path,
    rows: list[Row],
    settings: dict[str, Any],
    host: dict[str, Any],
    skipped: dict[str, str],
    *,
    open_loop: list[dict[str, Any]] | None = None,
    footprint: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """bench.json (every run) and bench.md (table, targets, machine) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    checked = goals(rows)
    open_loop = open_loop or []
    footprint = footprint or {}
    doc = {
        "machine": host,
        "settings": settings,
        "targets": [asdict(r) | {"median": {f: r.figure(f) for f in FIGURES}} for r in rows],
        "goals": checked,
        "skipped": skipped,
        "open_loop": open_loop,
        "footprint": footprint,
    }
    json_path = out / "bench.json"
    json_path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    libs = ", ".join(f"{k} {v}" for k, v in host["libraries"].items())
    tools = ", ".join(f"{k}: {v}" for k, v in host["tools"].items())
    md = [
        "# Side-by-side benchmark: rollguard against its peers",
        "",
        f"`python -m load_tests.bench`, {host['date']}, commit {host.get('commit', 'unknown')}. "
        f"Medians over {settings['rounds']} "
        f"interleaved round(s){_order(settings)}; each run {settings['duration_s']:g} s at "
        f"{settings['connections']} connections after a {settings['warmup_s']:g} s warm-up; "
        f"client: {settings['client']}. Every request is the same V2 JSON body (one "
        "breast_cancer row); CPU is utime+stime of every serving process (proxies, their "
        "upstreams, nginx master and worker) per 1,000 answered requests."
        + _other_load(rows, settings),
        "",
        table(rows),
        "",
        "Targets:",
        "",
        *(f"- **{r.target}**: {r.about}{_state(r.notes)}" for r in rows),
        *(f"- **{name}**: skipped — {why}" for name, why in skipped.items()),
        "",
        "## Goals from the issue",
        "",
        "Each goal is judged on the median over rounds of that round's ratio (the targets "
        "of one round ran back to back); the range of those and the ratio of the table's "
        "medians follow it.",
        "",
        *goal_lines(checked),
        *_open_loop_section(open_loop, rows, settings),
        *footprint_section(footprint),
        "",
        "## Profiles (py-spy, one extra run per target, front process only)",
        "",
        *(
            line
            for r in rows
            if "profile" in r.notes
            for line in (f"- **{r.target}**", *r.notes["profile"])
        ),
        "",
        "## Machine",
        "",
        f"- {host['nproc']} CPUs: {host['cpu']}; {host['memory_gib']} GiB; Linux {host['kernel']}",
        f"- load average at start {host['load_average_at_start']} (a shared machine: other "
        "work was running; ratios within one run are the figures to read)",
        f"- Python {host['python']}; {libs}",
        f"- {tools}",
        "",
    ]
    md_path = out / "bench.md"
    md_path.write_text("\n".join(md) + kept_notes(md_path), encoding="utf-8")
    return md_path, json_path


def rerender(out: Path) -> tuple[Path, Path]:
    """Rewrite bench.md (and bench.json) from the runs recorded in bench.json."""
    doc = orjson.loads((out / "bench.json").read_bytes())
    rows = [Row(t["target"], t["about"], t["runs"], t["notes"]) for t in doc["targets"]]
    return write(
        out,
        rows,
        doc["settings"],
        doc["machine"],
        doc["skipped"],
        open_loop=doc.get("open_loop"),
        footprint=doc.get("footprint"),
    )


def _open_loop_section(
    runs: list[dict[str, Any]], rows: list[Row], settings: dict[str, Any]
) -> list[str]:
    if not runs:
        return []
    from load_tests.bench import latency  # the open-loop mode's own tables

    closed = {r.target: r for r in rows}
    return [
        "",
        "## Added latency at a fixed rate (open loop)",
        "",
        f"After the closed-loop rounds: {settings.get('open_rounds')} interleaved round(s) of "
        f"{settings.get('open_duration_s', 0):g} s runs, every target sent the same fixed "
        "arrival rate, a share of bare's (the direct upstream's) closed-loop capacity in "
        "its slowest round, by "
        "load_tests/bench/openloop.py (latency from each request's due time). Added = the "
        "target's figure minus bare's in the same round (medians over rounds). mirrored: "
        "shadow copies sent over copies wanted; compared/s: shadow answers compared with "
        "the primary's (nginx: requests its mirror upstream answered).",
        "",
        *latency.table(runs),
        *_shadow_section(runs),
        "",
        "Must show (issue 17), open loop and shadows:",
        "",
        *latency.must_show(runs, closed),
    ]


def _shadow_section(runs: list[dict[str, Any]]) -> list[str]:
    from load_tests.bench import latency

    table = latency.shadow_table(runs)
    if not table:
        return []
    return [
        "",
        "Shadows at half their own capacity (the issue's shadow goal): each shadow target "
        "and its no-shadow twin, back to back in each round, at 50 % of the twin's "
        "closed-loop capacity in its slowest round; p99 x twin is the median of the "
        "per-round ratios. nginx's mirror and proxy are the same pair for nginx, a reference "
        "for what two upstream calls a request cost on this machine.",
        "",
        *table,
    ]


def footprint_section(found: dict[str, Any]) -> list[str]:
    if not found:
        return []
    from load_tests.bench import footprint  # the footprint mode's own lines

    return ["", *footprint.lines(found)]
