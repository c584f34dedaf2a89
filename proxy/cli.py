"""The `rollguard` command line: serve, demo, policy, registry, rollout actions, audit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollguard import __version__
from rollguard.proxy.when import ACCEPTED, BadTime, parse_when, utc_now

if TYPE_CHECKING:
    from rollguard.proxy.settings import Settings

DEFAULT_URL = "http://127.0.0.1:8081"  # the admin port


class CliError(Exception):
    """A failure to report as one line on stderr with a non-zero exit."""


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    import uvloop

    from rollguard.proxy.gateway import Gateway
    from rollguard.proxy.settings import load_settings

    settings = load_settings(
        args.config,
        {
            "registry": args.registry,
            "policies": args.policies,
            "state": args.state,
            "host": args.host,
            "port": args.port,
            "admin_host": args.admin_host,
            "admin_port": args.admin_port,
            "grpc_host": args.grpc_host,
            "grpc_port": args.grpc_port,
            "grpc_enabled": False if args.no_grpc else None,
            "workers": args.workers,
        },
    )
    from rollguard.proxy.admin import admin_token

    if settings.workers > 1:
        _check_workers(settings)
    admin_token(settings)  # refuse a missing, empty or short token before anything starts
    # Refuse what would fail anyway before the state directory or audit log is touched.
    if not settings.registry.is_dir():
        raise CliError(
            f"registry directory {settings.registry} does not exist or is not a directory "
            "(--registry, ROLLGUARD_REGISTRY or registry: in the settings file)"
        )
    worker = args.worker_index  # one of `serve --workers N`'s processes; None: not one
    if worker is None:  # a worker's ports: checked by its supervisor, shared with siblings
        for what, host, port in _ports(settings):
            _check_port_free(what, host, port)
    else:
        from rollguard.proxy.workers import die_with_parent

        die_with_parent()
        settings = settings.model_copy(update={"admin_port": settings.admin_port + worker})
    where = "" if worker is None else f" [worker {worker}]"
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s",
    )
    if worker is None and settings.workers > 1:
        from rollguard.proxy.workers import supervise

        return supervise(args.argv, settings.workers)
    log = logging.getLogger("rollguard")

    async def run() -> None:
        gateway = Gateway(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            # SIGTERM (Kubernetes, systemd): drain first. SIGINT, or a second signal: now.
            if stop.is_set() or signum == signal.SIGINT:
                gateway.hurry()
            stop.set()

        # Before the ports open: a SIGTERM that comes while the gateway starts (its data
        # port may already answer) stops it as gracefully as one that comes later.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        await gateway.start()
        if args.ready_fd is not None:
            from rollguard.proxy.workers import tell_ready

            tell_ready(args.ready_fd)
        log.info(
            "======== Running on http://%s:%d (admin http://%s:%d) ========",
            settings.host, gateway.port, settings.admin_host, gateway.admin_port,
        )  # fmt: skip
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await gateway.drain()
            await gateway.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
    stuck = _model_threads_still_running(within_s=1.0)
    if stuck:
        # A call that outlived its deadline still runs in native code on a daemon thread;
        # finalising the interpreter under it can abort the process (ONNX Runtime:
        # "terminate called without an active exception"). Everything is closed and
        # written by now, so leave without finalising.
        log.warning(
            "exiting with %d model call(s) still running past their deadline: %s",
            len(stuck), ", ".join(stuck),
        )  # fmt: skip
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _model_threads_still_running(within_s: float) -> list[str]:
    """Names of the model threads (serving/bulkhead.py `Threads`) still alive after
    giving the idle ones, told to end at unload, up to `within_s` to do so."""
    from rollguard.serving.bulkhead import THREAD_PREFIX

    deadline = time.monotonic() + within_s
    alive = []
    for thread in threading.enumerate():
        if thread.name.startswith(THREAD_PREFIX) and thread.daemon:
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                alive.append(thread.name)
    return alive


def _check_workers(settings: Settings) -> None:
    """CliError unless `settings` can run as several workers: fleet mode (a file state
    cannot be shared by processes) and fixed ports (worker K's admin port is
    admin_port + K; the data and gRPC ports are shared), none of them overlapping."""
    n = settings.workers
    if settings.fleet_state is None:
        raise CliError(
            f"--workers {n} needs fleet mode: set state: redis://host:port/db (--state, "
            "ROLLGUARD_STATE or the settings file); a state directory is one process's"
        )
    fixed = {"--port": settings.port, "--admin-port": settings.admin_port}
    if settings.grpc_enabled:
        fixed["--grpc-port"] = settings.grpc_port
    for flag, port in fixed.items():
        if port == 0:
            raise CliError(f"--workers {n} needs a fixed port, not {flag} 0")
    last = settings.admin_port + n - 1
    if last > 65535:
        raise CliError(f"--workers {n}: admin ports {settings.admin_port}..{last} pass 65535")
    for flag in ("--port", "--grpc-port"):
        if flag in fixed and settings.admin_port <= fixed[flag] <= last:
            raise CliError(
                f"--workers {n}: the admin ports {settings.admin_port}..{last} (one per "
                f"worker) take {flag} {fixed[flag]}; pick another --admin-port"
            )


def _ports(settings: Settings) -> list[tuple[str, str, int]]:
    """(what, host, port) of every port `serve` will listen on: the data and gRPC ports
    once (the workers share them), an admin port per worker."""
    ports = [("data", settings.host, settings.port)]
    admin = settings.admin_port
    for k in range(settings.workers if admin else 1):
        ports.append(("admin" if k == 0 else f"worker {k} admin", settings.admin_host, admin + k))
    if settings.grpc_enabled:
        ports.append(("gRPC", settings.grpc_host or settings.host, settings.grpc_port))
    return ports


def _check_port_free(what: str, host: str, port: int) -> None:
    """Bind and release host:port as the gateway will (SO_REUSEADDR); port 0 is always free."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CliError(f"{what} port: cannot resolve host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise CliError(
                f"{what} port {host}:{port} is not free ({exc.strerror}); "
                f"stop what holds it or pick another port"
            ) from None


def _demo(args: argparse.Namespace) -> int:
    from rollguard.proxy.demo import run_demo

    return run_demo(workdir=args.workdir, port=args.port)


def _policy_check(args: argparse.Namespace) -> int:
    from rollguard.policy.loader import check_files
    from rollguard.proxy.settings import load_settings

    # Webhook hosts are checked against the same setting the gateway will use.
    hosts = load_settings(args.config).webhook_allowed_hosts
    failed = 0
    for path, error in check_files([Path(p) for p in args.files], webhook_hosts=hosts):
        if error is None:
            print(f"{path}: ok")
        else:
            failed += 1
            print(error, file=sys.stderr)
    return 1 if failed else 0


def _registry(args: argparse.Namespace) -> int:
    from rollguard.serving import catalog

    root = Path(args.registry)
    if args.registry_command != "add" and not root.is_dir():
        raise CliError(f"registry directory {root} does not exist or is not a directory")
    if args.registry_command in ("list", "verify"):
        checks = catalog.version_checks(root)
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        bad = 0
        for done, check in enumerate(checks, 1):
            info = check()  # reads and hashes the artifact: seconds for a large model
            if progress:
                print(f"[{done}/{len(checks)}] {info.model}/{info.version}", file=sys.stderr)
            status = info.status if info.reason is None else f"{info.status}: {info.reason}"
            bad += info.reason is not None
            print(f"{info.model}/{info.version}\t{info.framework}\t{info.stage}\t{status}")
            sys.stdout.flush()
        if not checks:
            print(f"no versions under {root}")
        return 1 if bad and args.registry_command == "verify" else 0
    if args.registry_command == "show":
        print(json.dumps(catalog.show(root, args.model, args.version), indent=2, default=str))
        return 0
    from rollguard.serving.signatures import tensor_from_flag

    inputs = [tensor_from_flag(t) for t in args.input] if args.input else None
    outputs = [tensor_from_flag(t) for t in args.output] if args.output else None
    path = catalog.add(
        root,
        Path(args.artifact) if args.artifact else None,
        model=args.model,
        version=args.version,
        framework=args.framework,
        stage=args.stage,
        parent=args.parent,
        created_by=args.created_by or os.environ.get("USER"),
        endpoint=args.endpoint,
        trusted_types=args.trusted_type,
        inputs=inputs,
        outputs=outputs,
        trust_pickle=args.trust_pickle,
        reference=Path(args.reference) if args.reference else None,
        upstream_model=args.upstream_model,
        upstream_version=args.upstream_version,
    )
    print(f"added {args.model}/{args.version} at {path}")
    return 0


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: the bearer token must never travel to another origin."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _request(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("ROLLGUARD_ADMIN_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            where = _origin(exc.headers.get("Location") or "", req.full_url)
            raise CliError(
                f"{method} {path}: {exc.code} redirect to {where} not followed (the admin "
                "token is only sent to --url); point --url at the gateway's admin port"
            ) from None
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        raise CliError(f"{method} {path}: {exc.code} {message}") from None
    except urllib.error.URLError as exc:
        raise CliError(f"cannot reach rollguard at {url}: {exc.reason}") from None


def _origin(location: str, base: str) -> str:
    """scheme://host[:port] of a redirect target (nothing of its path or query)."""
    target = urllib.parse.urlsplit(urllib.parse.urljoin(base, location))
    return f"{target.scheme}://{target.netloc.rpartition('@')[2]}" if target.netloc else "?"


_STATUS_COLUMNS = (
    ("NAME", "name"),
    ("MODEL", "model"),
    ("STRATEGY", "strategy"),
    ("PHASE", "phase"),
    ("STABLE", "stable"),
    ("CANDIDATE", "candidate"),
    ("WEIGHT", "weight"),
    ("REASON", "reason"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "weight":
        return f"{value:g}%"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart; the last one left ragged."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    lines = []
    for row in (header, *rows):
        padded = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def _status(args: argparse.Namespace) -> int:
    overview = _request(args.url, "GET", "/admin/rollouts")
    if args.output == "json":
        print(json.dumps(overview, indent=2, sort_keys=True))
        return 0
    rows = [[_cell(k, r.get(k)) for _, k in _STATUS_COLUMNS] for r in overview["rollouts"]]
    if rows:
        sys.stdout.write(table([title for title, _ in _STATUS_COLUMNS], rows))
    else:
        print("no rollouts")
    for bad in overview.get("rejected", []):
        print(f"REJECTED {bad['file']}: {bad['error']}")
    return 0


def _action(args: argparse.Namespace) -> int:
    overview = _request(args.url, "GET", "/admin/rollouts")
    names = [r["name"] for r in overview["rollouts"] if args.model in (r["name"], r["model"])]
    if not names:
        raise CliError(f"no rollout for {args.model!r}")
    if len(names) > 1:
        raise CliError(f"{args.model!r} matches rollouts {names}; name one")
    actor = args.actor or os.environ.get("USER") or "cli"
    result = _request(
        args.url,
        "POST",
        f"/admin/rollouts/{names[0]}/{args.command}",
        {"actor": actor, "reason": args.reason or ""},
    )
    print(f"{names[0]}: {result.get('phase')} (weight {result.get('weight')}%)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from rollguard.policy.audit import adopt_key, export, verify
    from rollguard.policy.keys import load_key

    if str(args.state).startswith(("redis://", "rediss://")):  # a fleet's audit stream
        try:
            from rollguard.proxy.fleet.commands import audit_command
        except ImportError as exc:
            raise CliError(
                f"a redis:// state needs: pip install 'rollguard[fleet]' ({exc})"
            ) from None
        return audit_command(args)
    path = Path(args.state) / "audit.jsonl"
    if args.audit_command in ("verify", "adopt-key"):
        key_file = Path(args.key_file) if args.key_file else None
        key = load_key(os.environ.get("ROLLGUARD_AUDIT_KEY"), key_file, Path(args.state))
        if args.audit_command == "adopt-key":
            if key is None:
                raise CliError("adopt-key needs the key: ROLLGUARD_AUDIT_KEY or --key-file")
            entry = adopt_key(path, key)
            print(f"{path}: sealed with audit key {key.id} from entry {entry['seq']} on")
            return 0
        if not path.exists():  # a mistyped --state, or a log that was deleted: no pass
            raise CliError(
                f"no audit log at {path}: check --state (a state directory has one once its "
                "gateway has recorded anything)"
            )
        result = verify(path, key)
        if not result.ok:
            raise CliError(
                f"audit log {path} fails at "
                + (f"line {result.first_bad_line}" if result.first_bad_line else "its head file")
                + f": {result.reason}"
            )
        if key is not None:
            print(f"{path}: {result.entries} entries, chain intact, sealed with audit key {key.id}")
        else:
            print(
                f"{path}: {result.entries} entries, chain intact but UNKEYED: a plain sha256 "
                f"chain that anyone who can write {path.parent} can rewrite undetected; set "
                "ROLLGUARD_AUDIT_KEY (or audit_key_file) to seal it with an HMAC key"
            )
        return 0
    text = export(path, since=args.since, until=args.until, fmt=args.format)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _when(text: str) -> datetime:
    """argparse type for --since/--until: the error names every accepted form."""
    try:
        return parse_when(text, utc_now())
    except BadTime as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _url_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("ROLLGUARD_URL", DEFAULT_URL),
        help=f"the gateway's admin port (default $ROLLGUARD_URL or {DEFAULT_URL})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollguard", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"rollguard {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="settings file (default config/rollguard.yaml)")
    serve.add_argument("--registry", help="model registry directory (must exist)")
    serve.add_argument("--policies", help="rollout policies directory")
    serve.add_argument("--state", help="state and audit directory, or redis://host:port/db (fleet)")
    serve.add_argument("--host", help="data port address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="data port (default 8080; must be free)")
    serve.add_argument("--admin-host", help="admin port address (default 127.0.0.1)")
    serve.add_argument("--admin-port", type=int, help="admin port: /admin, /metrics (8081)")
    serve.add_argument("--grpc-host", help="gRPC port address (default: the --host address)")
    serve.add_argument("--grpc-port", type=int, help="V2 gRPC API port (default 8082)")
    serve.add_argument(
        "--no-grpc", action="store_true", help="serve no gRPC port (grpc_enabled: false)"
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="processes sharing the data and gRPC ports; worker K's admin port is "
        "--admin-port + K (default 1; more needs state: redis://)",
    )
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by workers.py
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # set by workers.py
    serve.set_defaults(func=_serve)

    demo = sub.add_parser(
        "demo", help="build a registry, serve it, roll a bad and a good candidate"
    )
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path("rollguard-demo"),
        help="where the demo registry, policies and state go (default rollguard-demo)",
    )
    demo.add_argument("--port", type=int, default=0, help="0 picks a free port")
    demo.set_defaults(func=_demo)

    policy = sub.add_parser("policy", help="rollout policy files")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    check = psub.add_parser("check", help="validate policy files offline")
    check.add_argument("files", nargs="+", help="Rollout YAML files")
    check.add_argument(
        "--config", type=Path, help="settings file whose webhook_allowed_hosts apply"
    )
    check.set_defaults(func=_policy_check)

    # --registry is taken before the subcommand and after it (`registry verify --registry D`).
    registry_help = "registry directory (default $ROLLGUARD_REGISTRY or ./registry)"
    registry = sub.add_parser("registry", help="inspect or add to a registry directory")
    registry.add_argument(
        "--registry", default=os.environ.get("ROLLGUARD_REGISTRY", "registry"), help=registry_help
    )
    rsub = registry.add_subparsers(dest="registry_command", required=True)
    listing = rsub.add_parser("list", help="every version and whether it verifies")
    verify = rsub.add_parser(
        "verify", help="check manifests and sha256; non-zero exit on any failure"
    )
    show = rsub.add_parser("show", help="one version's manifest and verification")
    show.add_argument("model", help="model name")
    show.add_argument("version", help="version")
    add = rsub.add_parser(
        "add", help="copy an artifact in (or name an http --endpoint) and write its manifest"
    )
    for each in (listing, verify, show, add):
        each.add_argument("--registry", default=argparse.SUPPRESS, help=registry_help)
    for each in (listing, verify):
        each.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="[n/total] on stderr as each version is hashed (default: when a terminal)",
        )
    add.add_argument("artifact", nargs="?", help="the model file; none with an --endpoint")
    add.add_argument("--model", required=True, help="model name")
    add.add_argument("--version", required=True, help="version to register")
    add.add_argument(
        "--framework",
        choices=["onnx", "torch", "sklearn", "http", "grpc"],
        help="default: from the artifact's suffix",
    )
    add.add_argument("--stage", default="development", help="lifecycle stage (development)")
    add.add_argument("--parent", help="the version this one derives from")
    add.add_argument("--created-by", help="who registered it (default $USER)")
    add.add_argument(
        "--endpoint",
        help="framework http: the upstream's V2 model URL; grpc: grpc://host:port or host:port",
    )
    add.add_argument("--upstream-model", help="framework grpc: the upstream's model name")
    add.add_argument("--upstream-version", help="framework grpc: the upstream's version")
    for flag in ("input", "output"):
        add.add_argument(
            f"--{flag}",
            action="append",
            metavar="NAME:DATATYPE:SHAPE",
            help=f"declare an {flag} tensor, e.g. {flag}:FP32:-1,30 (repeat for more)",
        )
    add.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a .joblib/.pt/.pt2 to read its signature (unpickling runs its code)",
    )
    add.add_argument("--trusted-type", action="append", help="a skops type you vouch for")
    add.add_argument("--reference", help="a .npy/.npz sample of training inputs (drift)")
    registry.set_defaults(func=_registry)

    status = sub.add_parser("status", help="rollouts of a running gateway")
    _url_flag(status)
    status.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default="table",
        help="an aligned table with a header (default) or the admin API's JSON",
    )
    status.set_defaults(func=_status)

    for action in ("rollback", "promote", "pause", "resume", "approve"):
        cmd = sub.add_parser(action, help=f"{action} the rollout of MODEL")
        cmd.add_argument("model", help="model or rollout name")
        _url_flag(cmd)
        cmd.add_argument("--actor", help="who acts (default $USER)")
        cmd.add_argument("--reason", help="why, recorded in the audit log")
        cmd.set_defaults(func=_action)

    # --state is taken before the subcommand and after it (`audit verify --state DIR`).
    state_help = (
        "state directory holding audit.jsonl, or a fleet's redis://host:port/db "
        "(default $ROLLGUARD_STATE or .rollguard)"
    )
    audit = sub.add_parser("audit", help="the hash-chained audit log")
    audit.add_argument(
        "--state", default=os.environ.get("ROLLGUARD_STATE", ".rollguard"), help=state_help
    )
    asub = audit.add_subparsers(dest="audit_command", required=True)
    key_help = "audit key file (default $ROLLGUARD_AUDIT_KEY_FILE; or $ROLLGUARD_AUDIT_KEY)"
    for name, text in (
        ("verify", "non-zero exit on any changed, removed or reordered line"),
        ("adopt-key", "seal an intact unkeyed log with the audit key from here on"),
    ):
        keyed = asub.add_parser(name, help=text)
        keyed.add_argument("--state", default=argparse.SUPPRESS, help=state_help)
        keyed.add_argument(
            "--key-file", default=os.environ.get("ROLLGUARD_AUDIT_KEY_FILE"), help=key_help
        )
    exp = asub.add_parser("export", help="entries in a time range as JSON or CSV")
    exp.add_argument("--state", default=argparse.SUPPRESS, help=state_help)
    exp.add_argument("--since", type=_when, metavar="WHEN", help=f"from (inclusive): {ACCEPTED}")
    exp.add_argument("--until", type=_when, metavar="WHEN", help="to (exclusive); as --since")
    exp.add_argument("--format", choices=["json", "csv"], default="json", help="default json")
    exp.add_argument("--output", help="write to this file instead of stdout")
    audit.set_defaults(func=_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `serve --workers` reruns
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"rollguard: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # every product error becomes one line, not a traceback
        from rollguard.policy.errors import PolicyError
        from rollguard.proxy.settings import SettingsError
        from rollguard.serving.errors import ServingError

        if isinstance(exc, PolicyError | ServingError | SettingsError | OSError | ValueError):
            print(f"rollguard: {exc}", file=sys.stderr)
            return 1
        raise
    return code


if __name__ == "__main__":
    sys.exit(main())
