"""Which Host headers the server answers, and the headers every response gets (a pure ASGI layer).

A page on any web site can make the browser send requests to a server on 127.0.0.1 under the site's
own name, by re-pointing that name's DNS at 127.0.0.1 ("DNS rebinding"); the Host header still
carries the site's name. So a server bound to loopback answers only Host names that mean loopback
(localhost, 127.x.x.x, [::1]); --allowed_hosts adds names (or "*" for any) for proxies and LAN setups.
A server bound to another address answers any Host unless --allowed_hosts is given.
"""
from __future__ import annotations

import ipaddress
import json

PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; font-src 'self'; "
            "connect-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


class HostPolicy:
    def __init__(self, bind_host: str, allowed: list[str] | tuple[str, ...] | None = None):
        allowed = [a.strip().lower().rstrip(".") for a in (allowed or ()) if a.strip()]
        self.any = "*" in allowed or (not allowed and not is_loopback(bind_host))
        self.names = [host_name(a) if not a.startswith("*.") else a for a in allowed]

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        if not header:
            return False
        host = host_name(header)
        return is_loopback(host) or any(host == n or (n.startswith("*.") and host.endswith(n[1:]))
                                        for n in self.names)


class FrontDoor:
    """ASGI middleware: refuses requests for other Host names (400), adds nosniff and the page's CSP."""

    def __init__(self, app, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        if not self.policy.allows(host):
            return await _refuse_host(host, send)
        path = scope["path"]
        page = path == "/" or path.startswith("/static")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                if page:
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _refuse_host(host: str | None, send) -> None:
    shown = json.dumps(host[:80]) if host else "missing"
    message = (f"Host header {shown} is not served here; this server answers only localhost, loopback addresses "
               "and the names given with --allowed_hosts (start it with --allowed_hosts NAME to add one)")
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "host_not_allowed"}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": body})
