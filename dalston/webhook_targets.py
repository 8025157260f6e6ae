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


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone index is no part of it
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback, whatever Python < 3.13 says
    return ip.is_global and not ip.is_multicast


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
