"""Fetching client-chosen image URLs (SSRF guard): every refusal happens before a byte goes to a forbidden address.

Real HTTP servers on loopback addresses count the connections they accept; a refused fetch must leave the
forbidden server at zero. 127.0.0.1 is allow-listed where a test needs a server to reach.
"""

from __future__ import annotations

import http.server
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from common.errors import BadRequestError
from common.generation.fetch import FetchPolicy, FetchRefused, fetch_image_bytes
from common.generation.images import ImagePolicy, ImageSource, resolve
from tests.fixtures.vision import sample_image

PNG = sample_image(7)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path, _, query = self.path.partition("?")
        if path == "/img.png":
            self._send(200, "image/png", PNG)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/page":
            self._send(200, "text/html", b"<html>not an image</html>")
        elif path == "/declared-big":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(50_000_000))
            self.end_headers()
            self.wfile.write(PNG)
        elif path == "/streamed-big":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(64):
                piece = b"x" * 4096
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/slow":
            time.sleep(2.0)
            self._send(200, "image/png", PNG)
        elif path == "/not-really.png":
            self._send(200, "image/png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        else:
            self._send(404, "text/plain", b"no")

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self, host: str) -> None:
        super().__init__((host, 0), _Handler)
        self.connections = 0

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that stops reading (a refused transfer) breaks the pipe: expected here

    def get_request(self):  # type: ignore[no-untyped-def]
        got = super().get_request()
        self.connections += 1  # counted as the connection is accepted, before any byte is read
        return got


@dataclass
class Servers:
    allowed: _Server  # 127.0.0.1, allow-listed where a test needs it
    forbidden: _Server  # 127.0.0.2, never allow-listed

    def url(self, server: _Server, path: str) -> str:
        host, port = server.server_address[:2]
        return f"http://{host}:{port}{path}"


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    made = [_Server("127.0.0.1"), _Server("127.0.0.2")]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in made]
    for t in threads:
        t.start()
    yield Servers(*made)
    for s in made:
        s.shutdown()
        s.server_close()


ALLOW_LOCAL = FetchPolicy(allowed_hosts=("127.0.0.1",), timeout=5.0, max_bytes=100_000, max_redirects=2)


def counts(s: Servers) -> tuple[int, int]:
    return s.allowed.connections, s.forbidden.connections


async def refused(url: str, policy: FetchPolicy, servers: Servers, *, reaches_allowed: int = 0) -> str:
    before = counts(servers)
    with pytest.raises(FetchRefused) as info:
        await fetch_image_bytes(url, policy)
    after = counts(servers)
    assert after[1] == before[1], f"{url}: the forbidden server was contacted"
    assert after[0] - before[0] == reaches_allowed, f"{url}: unexpected connections to the allowed server"
    return str(info.value)


async def test_an_allow_listed_host_is_fetched(servers: Servers) -> None:
    data, kind = await fetch_image_bytes(servers.url(servers.allowed, "/img.png"), ALLOW_LOCAL)
    assert data == PNG and kind == "image/png"


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.png", "file:///etc/passwd", "gopher://127.0.0.1:70/",
                                 "javascript:alert(1)", "//127.0.0.1/x.png", "http:///x.png"])
async def test_only_http_and_https(url: str, servers: Servers) -> None:
    await refused(url, ALLOW_LOCAL, servers)


async def test_loopback_and_names_that_resolve_to_it_are_refused(servers: Servers) -> None:
    port = servers.forbidden.server_address[1]
    policy = FetchPolicy(timeout=5.0)  # nothing allow-listed
    for host in ("127.0.0.2", "localhost", "2130706434", "0x7f000002", "[::1]", "[::ffff:127.0.0.2]"):
        why = await refused(f"http://{host}:{port}/img.png", policy, servers)
        assert "address" in why or "resolve" in why, why
    for url in (servers.url(servers.allowed, "/img.png"),):
        await refused(url, policy, servers)


@pytest.mark.parametrize("host", ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.100.100.200",
                                  "224.0.0.1", "0.0.0.0", "[fd00:ec2::254]", "[fe80::1]", "[::]", "240.0.0.1"])
async def test_private_link_local_metadata_multicast_and_reserved_addresses_are_refused(
    host: str, servers: Servers
) -> None:
    why = await refused(f"http://{host}/latest/meta-data/", ALLOW_LOCAL, servers)
    assert "resolves to" in why and "address" in why, why


async def test_each_redirect_is_checked_again(servers: Servers) -> None:
    target = servers.url(servers.forbidden, "/img.png")
    why = await refused(servers.url(servers.allowed, f"/redirect?{target}"), ALLOW_LOCAL, servers, reaches_allowed=1)
    assert "127.0.0.2" in why
    why = await refused(servers.url(servers.allowed, "/redirect?file:///etc/passwd"), ALLOW_LOCAL, servers,
                        reaches_allowed=1)
    assert "http" in why


async def test_redirects_are_capped(servers: Servers) -> None:
    why = await refused(servers.url(servers.allowed, "/loop"), ALLOW_LOCAL, servers, reaches_allowed=3)  # 1 + 2 hops
    assert "redirects" in why


async def test_a_network_in_the_allow_list_admits_its_addresses(servers: Servers) -> None:
    policy = FetchPolicy(allowed_hosts=("127.0.0.0/8",), timeout=5.0)
    data, _ = await fetch_image_bytes(servers.url(servers.forbidden, "/img.png"), policy)
    assert data == PNG


async def test_only_images_within_the_size_and_time_caps(servers: Servers) -> None:
    why = await refused(servers.url(servers.allowed, "/page"), ALLOW_LOCAL, servers, reaches_allowed=1)
    assert "text/html" in why
    why = await refused(servers.url(servers.allowed, "/declared-big"), ALLOW_LOCAL, servers, reaches_allowed=1)
    assert "50,000,000" in why
    why = await refused(servers.url(servers.allowed, "/streamed-big"), ALLOW_LOCAL, servers, reaches_allowed=1)
    assert "larger than the limit" in why
    quick = FetchPolicy(allowed_hosts=("127.0.0.1",), timeout=0.5)
    why = await refused(servers.url(servers.allowed, "/slow"), quick, servers, reaches_allowed=1)
    assert "longer than" in why


async def test_credentials_in_urls_and_the_off_switch(servers: Servers) -> None:
    port = servers.allowed.server_address[1]
    await refused(f"http://user:pw@127.0.0.1:{port}/img.png", ALLOW_LOCAL, servers)
    off = FetchPolicy(allow_remote=False, allowed_hosts=("127.0.0.1",))
    why = await refused(servers.url(servers.allowed, "/img.png"), off, servers)
    assert "allow_remote_images" in why


async def test_refusals_and_bad_images_are_400s_naming_the_field(servers: Servers) -> None:
    policy = ImagePolicy(max_images=2, max_pixels=10_000, fetch=ALLOW_LOCAL)
    field = "messages[0].content[1].image_url.url"

    async def fails(value: str, *, count: int = 1) -> BadRequestError:
        with pytest.raises(BadRequestError) as info:
            await resolve([ImageSource(value, field)] * count, policy, vision=True, model_name="m")
        assert info.value.param == field
        return info.value

    got = await fails(servers.url(servers.forbidden, "/img.png"))
    assert got.code == "image_url_refused"
    assert "could not be decoded" in (await fails(servers.url(servers.allowed, "/not-really.png"))).message
    assert "base64" in (await fails("data:image/png;base64,@@@not base64@@@")).message
    import base64

    assert "not an image" in (await fails(base64.b64encode(b"just some text, not a picture").decode())).message
    truncated = base64.b64encode(PNG[: len(PNG) // 2]).decode()
    assert "truncated" in (await fails("data:image/png;base64," + truncated)).message
    big = base64.b64encode(sample_image(1, size=(200, 100))).decode()
    assert "limits.max_image_pixels" in (await fails(big)).message
    with pytest.raises(BadRequestError) as info:
        await resolve([ImageSource(base64.b64encode(PNG).decode(), f"images[{i}]") for i in range(3)], policy,
                      vision=True, model_name="m")
    assert info.value.param == "images[2]" and "max_images_per_request" in info.value.message
    with pytest.raises(BadRequestError) as info:
        await resolve([ImageSource("data:image/png;base64,AAAA", field)], policy, vision=False, model_name="m")
    assert info.value.param == field and info.value.code == "model_not_multimodal"
