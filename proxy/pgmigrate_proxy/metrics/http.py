"""A minimal HTTP/1.x responder on the proxy's own event loop: `GET /metrics` (and HEAD) answers
with the registry's exposition, anything else 404 (405 for other methods); one request per
connection.

Why not prometheus_client's start_http_server: it serves from a thread of its own, and the
collector reads loop-owned state (sessions, pools, the held statements), which another thread
could see half-changed (a dict changing size while iterated). Answering on the loop keeps every
read between two callbacks; the exposition of one pool costs the loop about 0.4 ms.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # (prometheus_client takes ~80 ms to import: only when metrics are served)
    from prometheus_client import CollectorRegistry

log = logging.getLogger("pgmigrate_proxy.metrics")

PATH = "/metrics"
#: How long a scraper has to send its request's head, and how long that head may be.
HEAD_SECONDS = 10.0
HEAD_LIMIT = 16384


class MetricsListenError(OSError):
    """metrics_listen could not be bound; str() names the setting and the address."""


class MetricsServer:
    """Serves `registry` at /metrics on (host, port)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, limit=HEAD_LIMIT, reuse_address=True
            )
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise MetricsListenError(
                exc.errno, f"cannot listen on metrics_listen {where}: {exc.strerror or exc}"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_SECONDS)
            writer.write(self._answer(head))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        except asyncio.LimitOverrunError:
            writer.write(_response(431, "Request Header Fields Too Large"))
        finally:
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        request, *lines = head.decode("latin-1").split("\r\n")
        parts = request.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response(400, "Bad Request")
        method, target, _version = parts
        if urlsplit(target).path != PATH:
            return _response(404, "Not Found")
        if method not in ("GET", "HEAD"):
            return _response(405, "Method Not Allowed", allow="GET, HEAD")
        from prometheus_client.exposition import choose_encoder

        headers = dict(_header(line) for line in lines if ":" in line)
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(self.registry)
        return _response(200, "OK", body, content_type, head_only=method == "HEAD")


def _header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()


def _response(
    status: int,
    reason: str,
    body: bytes | None = None,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
    allow: str | None = None,
) -> bytes:
    if body is None:
        body = f"{status} {reason}\n".encode()
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if allow is not None:
        lines.append(f"Allow: {allow}")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + (b"" if head_only else body)
