"""The aiohttp gateway: protocol, routing, shadow mirroring, windows, admin API, CLI."""
