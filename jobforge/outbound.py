"""Where requests that job configs aim (webhooks) may go: public addresses only, unless allow-listed.

A job config names the URL, so without a policy any submitter could make the service POST to its own
loopback, a cloud metadata endpoint (169.254.169.254) or hosts on the private network. The check is made on
the address actually connected to: `PolicyResolver` filters what DNS returns before aiohttp connects, so a
name that resolves to a public address for a check and to 127.0.0.1 for the connection (DNS rebinding) gets
nowhere. IP literals never reach a resolver in aiohttp, so `OutboundPolicy.check_url` checks them first.

Refused: loopback, link-local (169.254.0.0/16, fe80::/10), private (10/8, 172.16/12, 192.168/16, fc00::/7),
shared (100.64/10), unspecified, multicast, reserved and documentation ranges - anything `ipaddress` does
not call global - including IPv4 embedded in IPv6 (::ffff:a.b.c.d, 64:ff9b::/96). `JOBFORGE_WEBHOOK_ALLOW_HOSTS`
(comma-separated host names, IP addresses or CIDR networks) lets chosen destinations through.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class OutboundRefused(OSError):
    """The destination is not allowed; an OSError so aiohttp passes it through as a connection error."""


def _embedded_v4(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def why_not_public(ip: IPAddress) -> str | None:
    """None for a public unicast address, else what it is (for the delivery's recorded outcome)."""
    ip = _embedded_v4(ip)
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "not globally routable"
    return None


def _parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


class OutboundPolicy:
    def __init__(self, allow_hosts: Iterable[str] = ()) -> None:
        self._names: set[str] = set()
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in (e.strip() for e in allow_hosts):
            if not entry:
                continue
            try:
                self._networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self._names.add(entry.lower().rstrip("."))

    @classmethod
    def from_setting(cls, value: str) -> "OutboundPolicy":
        return cls(value.split(","))

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self._names

    def check_address(self, host: str, ip: IPAddress) -> None:
        """Raise `OutboundRefused` unless `ip` is public, or `host` or `ip` is allow-listed."""
        if self.host_allowed(host) or any(ip in net or _embedded_v4(ip) in net for net in self._networks):
            return
        reason = why_not_public(ip)
        if reason is not None:
            raise OutboundRefused(f"refused by the outbound policy: {host} -> {ip} is {reason} "
                                  "(allow it with JOBFORGE_WEBHOOK_ALLOW_HOSTS)")

    def check_url(self, url: str) -> None:
        """What can be checked before connecting: an IP-literal host (a name is checked when it resolves)."""
        host = urlsplit(url).hostname or ""
        ip = _parse_ip(host)
        if ip is not None:
            self.check_address(host, ip)

    def resolver(self) -> "PolicyResolver":
        return PolicyResolver(self)


class PolicyResolver(AbstractResolver):
    """Resolves as usual, then keeps only the addresses the policy allows: aiohttp connects to nothing else."""

    def __init__(self, policy: OutboundPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed, refusals = [], []
        for result in results:
            try:
                self._policy.check_address(host, ipaddress.ip_address(result["host"]))
                allowed.append(result)
            except (OutboundRefused, ValueError) as exc:
                refusals.append(str(exc))
        if not allowed:
            raise OutboundRefused(refusals[0] if refusals else f"refused by the outbound policy: {host} "
                                                                "resolved to no address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
