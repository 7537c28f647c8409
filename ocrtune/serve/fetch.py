"""Fetching client-named image URLs (--allow_image_urls) without letting clients reach what the server can.

- only public unicast addresses are contacted: loopback, private, link-local (169.254.169.254, the
  cloud metadata service), carrier-grade NAT, multicast and reserved ranges are refused, unless
  --allowed_image_hosts names the address (or its network) explicitly;
- the check runs on the addresses the host name resolves to, and the connection goes to the very
  address that was checked (so a DNS answer that changes between check and connect can't help);
  every redirect hop is checked the same way; proxies from the environment are ignored;
- one total deadline and a byte cap bound each fetch;
- every refused or failed URL gets the same message, so the server can't be used to map which
  hosts and ports exist behind it.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpcore
import httpx

REFUSED = ("the image URL was not fetched (refused, unreachable, too slow, too large or not an image); "
           "send the image inline as a base64 data URL (data:image/png;base64,...)")
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(Exception):
    """The URL is not fetched; the reason is for the server log only."""


class UrlPolicy:
    """Which hosts may be fetched. `allowed`: host names ("images.example.com", "*.example.com" for its
    subdomains) and IP addresses or networks ("10.0.0.5", "10.1.0.0/16"). With names listed, only those
    hosts are fetched; a listed address or network is fetched even if it is private."""

    def __init__(self, allowed: list[str] | tuple[str, ...] = ()):
        self.names, self.networks = [], []
        for entry in allowed:
            entry = entry.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.names.append(entry)

    @property
    def restricted(self) -> bool:
        return bool(self.names or self.networks)

    def host_ok(self, host: str) -> bool:
        """Before resolving: with an allow-list, the name must be on it (or be an address checked later)."""
        if not self.restricted or _literal(host) is not None:
            return True
        host = host.lower().rstrip(".")
        return any(host == n or (n.startswith("*.") and host.endswith(n[1:])) for n in self.names)

    def address_ok(self, host: str, ip) -> bool:
        ip = _unmap(ip)
        if any(ip.version == net.version and ip in net for net in self.networks):
            return True
        if self.restricted and (_literal(host) is not None or not self.host_ok(host)):
            return False  # an address literal must be listed itself
        return is_public(ip)


def _literal(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def _unmap(ip):
    """IPv4 carried in IPv6 (::ffff:a.b.c.d, 64:ff9b::a.b.c.d) is judged as the IPv4 address."""
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def is_public(ip) -> bool:
    ip = _unmap(ip)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or ip.is_private or ip.is_unspecified)


class CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, resolving the host itself and connecting only to checked addresses."""

    def __init__(self, policy: UrlPolicy):
        self.policy, self.inner = policy, httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        ips = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not ips:
            raise Refused(f"{host} does not resolve")
        refused = [str(ip) for ip in ips if not self.policy.address_ok(host, ip)]
        if refused:  # one bad address refuses the host: a name mixing public and private ones is an attack
            raise Refused(f"{host} resolves to {', '.join(refused)}, which is not allowed")
        return await self.inner.connect_tcp(str(ips[0]), port, timeout=timeout, local_address=local_address,
                                            socket_options=socket_options)

    async def connect_unix_socket(self, *a, **k):  # pragma: no cover - never used for http(s) URLs
        raise Refused("unix sockets are never used")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


async def fetch(url: str, policy: UrlPolicy, max_bytes: int, deadline_s: float = 10.0) -> bytes:
    """GET an image URL within `deadline_s` seconds and `max_bytes`; raises Refused for anything else."""
    try:
        async with asyncio.timeout(deadline_s):
            return await _fetch(url, policy, max_bytes)
    except Refused:
        raise
    except TimeoutError:
        raise Refused(f"no answer within {deadline_s:g} s") from None
    except Exception as e:  # bad URLs, DNS failures, refused connections, TLS errors...
        raise Refused(f"{type(e).__name__}: {e}") from None


async def _fetch(url: str, policy: UrlPolicy, max_bytes: int) -> bytes:
    async with httpcore.AsyncConnectionPool(network_backend=CheckedBackend(policy), retries=0,
                                            max_connections=1) as pool:
        for _ in range(MAX_REDIRECTS + 1):
            target = httpx.URL(url)
            if target.scheme not in ("http", "https") or not target.host:
                raise Refused(f"not an http(s) URL: {url[:100]}")
            if not policy.host_ok(target.host):
                raise Refused(f"{target.host} is not in --allowed_image_hosts")
            where = httpcore.URL(scheme=target.raw_scheme, host=target.raw_host, port=target.port,
                                 target=target.raw_path)
            headers = [(b"Host", target.netloc), (b"Accept", b"image/*"), (b"User-Agent", b"ocrtune-serve")]
            async with pool.stream("GET", where, headers=headers) as r:
                if r.status in REDIRECTS:
                    location = dict((k.lower(), v) for k, v in r.headers).get(b"location")
                    if not location:
                        raise Refused(f"redirect {r.status} without a Location")
                    url = str(target.join(location.decode("latin-1")))
                    continue
                if r.status != 200:
                    raise Refused(f"HTTP {r.status}")
                return await _read_capped(r, max_bytes)
    raise Refused(f"more than {MAX_REDIRECTS} redirects")


async def _read_capped(response, max_bytes: int) -> bytes:
    data = bytearray()
    async for chunk in response.aiter_stream():
        data += chunk
        if len(data) > max_bytes:
            raise Refused(f"more than {max_bytes} bytes")
    return bytes(data)
