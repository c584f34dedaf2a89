"""Where a webhook may go: URL destinations and the operator's allow-list (pure logic)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollguard.policy import webhooks

labels = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
hostnames = st.lists(labels, min_size=1, max_size=4).map(".".join)
ports = st.integers(1, 65535)


@given(hostnames, ports)
def test_an_empty_list_allows_nothing(host: str, port: int) -> None:
    assert not webhooks.allowed(host, port, ())


@given(hostnames, ports, ports)
def test_a_host_entry_allows_every_port_and_a_host_port_entry_one(
    host: str, port: int, other: int
) -> None:
    assert webhooks.allowed(host.upper(), port, (host,))
    assert webhooks.allowed(host, port, (f"{host}:{port}",))
    assert webhooks.allowed(host, other, (f"{host}:{port}",)) is (other == port)


@given(hostnames, labels, ports)
def test_a_wildcard_allows_subdomains_only(domain: str, sub: str, port: int) -> None:
    assert webhooks.allowed(f"{sub}.{domain}", port, (f"*.{domain}",))
    assert not webhooks.allowed(domain, port, (f"*.{domain}",))
    assert not webhooks.allowed(f"{sub}{domain}", port, (f"*.{domain}",))


@given(hostnames, hostnames, ports)
def test_another_host_is_never_allowed(host: str, other: str, port: int) -> None:
    if host != other:
        assert not webhooks.allowed(other, port, (host, f"{host}:{port}"))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://Hooks.Example.com./x", ("hooks.example.com", 80)),
        ("https://hooks.example.com/x", ("hooks.example.com", 443)),
        ("http://[::1]:9000/x", ("::1", 9000)),
        ("http://[0:0:0:0:0:0:0:1]:9000/x", ("::1", 9000)),
    ],
)
def test_destination(url: str, expected: tuple[str, int]) -> None:
    assert webhooks.destination(url) == expected
    host, port = expected
    assert webhooks.allowed(host, port, ("[::1]:9000", "hooks.example.com"))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://hooks.example.com/x", "not an http"),
        ("http://u:p@hooks.example.com/x", "credentials"),
        ("http://hooks.example.com:99999/x", "invalid port"),
        ("http:///x", "names no host"),
    ],
)
def test_bad_destinations(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        webhooks.destination(url)


def test_listed_literally_means_the_address_itself() -> None:
    assert webhooks.listed_literally("169.254.169.254", ("169.254.169.254:80",))
    assert not webhooks.listed_literally("metadata.internal", ("metadata.internal",))
