"""nginx as the peer proxy: plain proxy_pass, split_clients, and mirror, in one config.

One master and one worker (a single process serves, like the Python targets), keep-alive
upstream pools, no access log. Three servers on three loopback ports:
  proxy   every request to upstream A
  split   split_clients on the x-user-id header: SPLIT_PERCENT to B, the rest to A
  mirror  every request to A and a copy to B (`mirror` + `mirror_request_body`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from load_tests.bench.procs import Process, Processes, free_port

SPLIT_PERCENT = 25

_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    upstream bare_a {{ server {upstream_a}; keepalive 64; }}
    upstream bare_b {{ server {upstream_b}; keepalive 64; }}
    split_clients "${{http_{key}}}" $variant {{
        {split}% bare_b;
        * bare_a;
    }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    server {{
        listen 127.0.0.1:{proxy_port};
        location / {{ proxy_pass http://bare_a; }}
    }}
    server {{
        listen 127.0.0.1:{split_port};
        location / {{ proxy_pass http://$variant; }}
    }}
    server {{
        listen 127.0.0.1:{mirror_port};
        location / {{
            mirror /mirror;
            mirror_request_body on;
            proxy_pass http://bare_a;
        }}
        location = /mirror {{
            internal;
            proxy_pass http://bare_b$request_uri;
        }}
    }}
}}
"""


@dataclass(frozen=True, slots=True)
class Nginx:
    process: Process
    proxy_port: int
    split_port: int
    mirror_port: int


def render(
    directory: Path,
    upstream_a: str,
    upstream_b: str,
    ports: tuple[int, int, int],
    key_header: str,
) -> str:
    """The nginx.conf text; upstreams are host:port."""
    return _CONF.format(
        dir=directory,
        upstream_a=upstream_a,
        upstream_b=upstream_b,
        key=key_header.lower().replace("-", "_"),
        split=SPLIT_PERCENT,
        proxy_port=ports[0],
        split_port=ports[1],
        mirror_port=ports[2],
    )


def start(
    procs: Processes,
    nginx: str,
    directory: Path,
    upstream_a: str,
    upstream_b: str,
    key_header: str,
) -> Nginx:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # workers run as an unprivileged user when started by root
    ports = (free_port(), free_port(), free_port())
    conf = directory / "nginx.conf"
    conf.write_text(render(directory, upstream_a, upstream_b, ports, key_header))
    process = procs.start("nginx", [nginx, "-p", str(directory), "-c", str(conf)])
    return Nginx(process, *ports)
