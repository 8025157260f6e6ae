"""Which URLs a webhook may call. The URL is anyone's input, so it must not reach into the
network Dalston runs in: http(s) only, no credentials in it, and every address its host
resolves to public, unless DALSTON_WEBHOOK_ALLOW_PRIVATE. Checked when a job is submitted and
again at each delivery, which then connects to the very address it checked (a name that
resolves elsewhere the second time, DNS rebinding, gains nothing). Audio URLs the gateway
fetches (ElevenLabs' cloud_storage_url) are checked the same way, under their own setting."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

RESOLVE_TIMEOUT_SECONDS = 5.0


class RefusedTarget(ValueError):
    """A webhook URL Dalston will not call; the text says why."""


@dataclass(frozen=True)
class Target:
    """A checked webhook URL and the address to connect to."""

    url: str
    host: str  # the name, for the Host header and TLS
    netloc: str  # host[:port], the Host header
    address: str  # the checked IP address
    pinned_url: str  # `url` with the host replaced by `address`


# IPv6 ranges that carry an IPv4 address in their low 32 bits: IPv4-mapped, IPv4-translated
# (SIIT), IPv4-compatible (deprecated) and the well-known NAT64 prefix. Each reaches the IPv4
# address inside on some host or network, so it is as public as that address.
_LOW_32_EMBEDDINGS = tuple(ipaddress.ip_network(n) for n in
                           ("::ffff:0:0/96", "::ffff:0:0:0/96", "::/96", "64:ff9b::/96"))
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # the IPv4 address in bits 16-47
# Local-use NAT64 (RFC 8215): private by definition, whatever address is embedded.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    if ip not in (ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")) \
            and any(ip in net for net in _LOW_32_EMBEDDINGS):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(address: str) -> bool:
    """Whether `address` is a public unicast address; an IPv6 one that embeds an IPv4 address
    (::ffff:127.0.0.1, ::a00:1, 64:ff9b::7f00:1, 2002:7f00:1::) is judged by that address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone index is no part of it
    if ip.version == 6:
        if ip in _LOCAL_NAT64 or ip.is_site_local:
            return False
        if (inner := _embedded_ipv4(ip)) is not None:
            ip = inner
        elif ip.is_reserved:  # ::/8 and the like, which Python < 3.13 calls global
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


async def check_target(url: str, allow_private: bool,
                       allow_setting: str = "DALSTON_WEBHOOK_ALLOW_PRIVATE") -> Target:
    """`url` resolved and checked; RefusedTarget if it must not be called. `allow_setting`
    names the setting that `allow_private` comes from."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise RefusedTarget(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RefusedTarget("must be an http or https URL with a host")
    if parts.username is not None or parts.password is not None:
        raise RefusedTarget("must not carry credentials (user:password@)")
    try:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
            parts.hostname, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_SECONDS)
    except (OSError, TimeoutError) as exc:
        raise RefusedTarget(f"its host {parts.hostname!r} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not allow_private:
        private = [a for a in addresses if not is_public(a)]
        if private:
            raise RefusedTarget(
                f"its host {parts.hostname!r} is on a loopback, private or reserved address "
                f"({', '.join(private)}); {allow_setting}=true allows that")
    address = addresses[0]
    host = f"[{address}]" if ":" in address else address
    pinned = parts._replace(netloc=f"{host}:{port}", path=parts.path or "/", fragment="").geturl()
    return Target(url=url, host=parts.hostname, netloc=parts.netloc, address=address, pinned_url=pinned)
