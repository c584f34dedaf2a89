"""The gateway: its HTTP/1.1 server, routing, shadow mirroring, windows, admin API, CLI."""
