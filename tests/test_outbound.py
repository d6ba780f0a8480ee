"""The outbound policy on addresses and names, and the resolver that enforces it on what is connected to."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from aiohttp.abc import AbstractResolver

from jobforge.outbound import OutboundPolicy, OutboundRefused, PolicyResolver

REFUSED = {
    "127.0.0.1": "loopback", "127.8.9.10": "loopback", "::1": "loopback",
    "169.254.169.254": "link-local", "fe80::1": "link-local",
    "10.1.2.3": "private", "172.16.0.1": "private", "172.31.255.255": "private", "192.168.1.1": "private",
    "fc00::1": "private", "fd12:3456::1": "private",
    "0.0.0.0": "unspecified", "::": "unspecified",
    "224.0.0.1": "multicast", "ff02::1": "multicast",
    "100.64.0.1": "not globally routable",
    "::ffff:127.0.0.1": "loopback", "::ffff:169.254.169.254": "link-local", "64:ff9b::a9fe:a9fe": "link-local",
}
PUBLIC = ["93.184.216.34", "8.8.8.8", "172.32.0.1", "2606:4700::1111"]


@pytest.mark.parametrize("address, kind", REFUSED.items())
def test_non_public_addresses_are_refused_and_named(address, kind):
    with pytest.raises(OutboundRefused) as refused:
        OutboundPolicy().check_address("hooks.example", ipaddress.ip_address(address))
    assert f"is {kind}" in str(refused.value) and "JOBFORGE_WEBHOOK_ALLOW_HOSTS" in str(refused.value)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    OutboundPolicy().check_address("hooks.example", ipaddress.ip_address(address))


def test_allow_list_takes_names_addresses_and_networks():
    policy = OutboundPolicy.from_setting(" Hooks.Internal. , 127.0.0.1,10.20.0.0/16,[::1]")
    policy.check_address("hooks.internal", ipaddress.ip_address("10.9.9.9"))  # the name is allowed, any address
    policy.check_address("other", ipaddress.ip_address("127.0.0.1"))
    policy.check_address("other", ipaddress.ip_address("10.20.3.4"))
    policy.check_address("other", ipaddress.ip_address("::1"))
    policy.check_address("other", ipaddress.ip_address("::ffff:127.0.0.1"))
    for address in ("127.0.0.2", "10.21.0.1", "169.254.169.254"):
        with pytest.raises(OutboundRefused):
            policy.check_address("other", ipaddress.ip_address(address))


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/x", "https://[::1]/x", "http://169.254.169.254/latest",
                                 "http://[::ffff:10.0.0.1]/x", "http://user:pw@192.168.0.1/x"])
def test_ip_literal_urls_are_checked_before_connecting(url):
    with pytest.raises(OutboundRefused):
        OutboundPolicy().check_url(url)


def test_names_are_left_to_the_resolver():
    OutboundPolicy().check_url("http://localhost:8080/x")  # checked on the addresses it resolves to


class Rebinding(AbstractResolver):
    """Answers with a public address first, then with loopback: a DNS-rebinding name."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [{"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
                for a in self.answers.pop(0)]

    async def close(self) -> None:
        pass


async def test_the_resolver_keeps_only_allowed_addresses_on_every_resolution():
    resolver = PolicyResolver(OutboundPolicy(), Rebinding(["93.184.216.34"], ["127.0.0.1"],
                                                          ["127.0.0.1", "93.184.216.34", "169.254.169.254"]))
    assert [r["host"] for r in await resolver.resolve("rebind.example", 80)] == ["93.184.216.34"]
    with pytest.raises(OutboundRefused, match="rebind.example -> 127.0.0.1 is loopback"):
        await resolver.resolve("rebind.example", 80)
    assert [r["host"] for r in await resolver.resolve("rebind.example", 80)] == ["93.184.216.34"]


async def test_an_allow_listed_name_resolves_unfiltered():
    resolver = PolicyResolver(OutboundPolicy(["hooks.internal"]), Rebinding(["10.0.0.7", "127.0.0.1"]))
    assert [r["host"] for r in await resolver.resolve("HOOKS.internal", 80)] == ["10.0.0.7", "127.0.0.1"]
