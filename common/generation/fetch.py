"""Fetching an image URL a client chose, without letting it reach what the server can reach (SSRF).

Every connection goes through `GuardedBackend`: it resolves the host itself,
refuses when any address is not public (loopback, private, link-local and
cloud metadata, multicast, reserved, unspecified, shared, IPv4 inside IPv6) unless
the host is allow-listed, and then connects to the address it checked, so a
second lookup cannot swap it (DNS rebinding). Redirects are followed by hand,
each hop re-checked the same way, up to a cap. Only http and https; only
`image/*` answers; a size cap enforced while reading and a deadline for the
whole fetch. Nothing is sent to a refused address: the refusal happens before
the connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpcore

from common.errors import BadRequestError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_REDIRECTS = (301, 302, 303, 307, 308)


class FetchRefused(Exception):
    """The URL, an address it resolves to, or its answer is not allowed; the message says which."""


@dataclass(frozen=True)
class FetchPolicy:
    allow_remote: bool = True
    allowed_hosts: tuple[str, ...] = ()  # host names, IP addresses, or networks such as 10.0.0.0/8
    max_bytes: int = 20_000_000
    timeout: float = 10.0
    max_redirects: int = 3
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        nets = []
        for entry in self.allowed_hosts:
            try:
                nets.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                continue  # a host name
        object.__setattr__(self, "_networks", tuple(nets))

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == entry.strip().lower().rstrip(".") for entry in self.allowed_hosts)

    def address_allowed(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self._networks)


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why an address may not be fetched from (None: it is a public address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in (ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None):
            if inner is not None:
                why = forbidden_reason(inner)
                if why:
                    return f"{why} (inside IPv6 {ip})"
    for test, why in (
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address (cloud metadata lives there)"),
        (ip.is_private, "a private address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_reserved, "a reserved address"),
    ):
        if test:
            return why
    if not ip.is_global:
        return "not a public address"
    return None


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks and connects to the checked address; every connection of a fetch passes here."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._inner = httpcore.AnyIOBackend()
        self.connected: list[str] = []  # addresses connected to, for the log

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        address = await self.checked_address(host, port)
        self.connected.append(address)
        return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)

    async def checked_address(self, host: str, port: int) -> str:
        policy = self.policy
        by_name = policy.host_allowed(host)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise FetchRefused(f"the host '{host}' does not resolve ({exc})") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not addresses:
            raise FetchRefused(f"the host '{host}' has no address")
        for ip in addresses:
            why = forbidden_reason(ip)
            if why and not (by_name or policy.address_allowed(ip)):
                raise FetchRefused(
                    f"'{host}' resolves to {ip}, {why}; the server does not fetch from such addresses "
                    "(vision.remote_image_allowed_hosts lists exceptions)"
                )
        return str(addresses[0])

    async def connect_unix_socket(self, *args: object, **kwargs: object) -> httpcore.AsyncNetworkStream:
        raise FetchRefused("unix sockets are never fetched")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def check_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; FetchRefused otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchRefused(f"the URL is malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchRefused(f"only http and https URLs are fetched, not '{scheme or 'no scheme'}:'")
    if not parts.hostname:
        raise FetchRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise FetchRefused("URLs with credentials are not fetched")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80)


async def fetch_image_bytes(url: str, policy: FetchPolicy) -> tuple[bytes, str]:
    """The body and content type of an image URL, under the policy; FetchRefused when not allowed."""
    if not policy.allow_remote:
        raise FetchRefused("this server does not fetch image URLs (vision.allow_remote_images is off); send the "
                           "image as a data: URI or base64")
    try:
        async with asyncio.timeout(policy.timeout):
            return await _fetch(url, policy)
    except TimeoutError:
        raise FetchRefused(f"fetching the image took longer than {policy.timeout:g}s") from None


async def _fetch(url: str, policy: FetchPolicy) -> tuple[bytes, str]:
    backend = GuardedBackend(policy)
    async with httpcore.AsyncConnectionPool(network_backend=backend, max_connections=1, retries=0) as pool:
        for _ in range(policy.max_redirects + 1):
            check_url(url)
            try:
                async with pool.stream(
                    "GET", url, headers=[(b"Accept", b"image/*"), (b"User-Agent", b"Parley image fetch")]
                ) as response:
                    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
                    if response.status in _REDIRECTS:
                        location = headers.get("location")
                        if not location:
                            raise FetchRefused(f"a {response.status} redirect without a Location")
                        url = urljoin(url, location)
                        continue
                    if response.status != 200:
                        raise FetchRefused(f"the server answered {response.status}")
                    kind = headers.get("content-type", "").split(";")[0].strip().lower()
                    if not kind.startswith("image/"):
                        raise FetchRefused(f"the answer is '{kind or 'of no content type'}', not an image")
                    declared = headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > policy.max_bytes:
                        raise FetchRefused(f"the image is {int(declared):,} bytes; the limit is {policy.max_bytes:,}")
                    body = bytearray()
                    async for piece in response.aiter_stream():
                        body.extend(piece)
                        if len(body) > policy.max_bytes:
                            raise FetchRefused(f"the image is larger than the limit of {policy.max_bytes:,} bytes")
                    return bytes(body), kind
            except httpcore.ConnectError as exc:
                if isinstance(exc.__cause__, FetchRefused):
                    raise exc.__cause__ from None
                raise FetchRefused(f"could not connect ({exc})") from None
            except (httpcore.ProtocolError, httpcore.ReadError, httpcore.NetworkError) as exc:
                raise FetchRefused(f"the transfer failed ({exc})") from None
        raise FetchRefused(f"more than {policy.max_redirects} redirects")


def refused(field_name: str, exc: FetchRefused) -> BadRequestError:
    return BadRequestError(f"{field_name}: the image URL was refused: {exc}.", param=field_name, code="image_url_refused")
