"""A small HTTP/1.1 keep-alive client on asyncio streams, for JSON POSTs to inference servers.

Why not httpx: on the 2-core development machine httpx spent about 4 ms of CPU per request
and its connection pool scans every connection on each dispatch, so with 128 requests in
flight it delivered about 40 requests/s against a server that answers in 200 ms (ideal 640;
benchmarks/results/synth_client.md): the client, not the inference server, was the
bottleneck. This transport sends each request in one write, parses only status, headers and the body
(Content-Length, chunked or read-to-close), and keeps one idle-connection stack per server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

_MAX_HEAD_BYTES = 1 << 16


class HttpProtocolError(ConnectionError):
    """The server's answer is not valid HTTP/1.1 (treated like a dropped connection)."""


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    @property
    def usable(self) -> bool:
        # A keep-alive connection the server closed while idle shows EOF (or buffered junk).
        return not self.writer.is_closing() and not self.reader.at_eof()


class HttpPool:
    """Keep-alive connections to one origin (scheme://host:port)."""

    def __init__(self, base_url: str, headers: dict[str, str], connect_timeout: float):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme in {base_url!r}")
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path_prefix = parts.path.rstrip("/")
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        host_header = parts.netloc.rsplit("@", 1)[-1]
        self._fixed_head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._host_header = host_header
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        async with asyncio.timeout(self._connect_timeout):
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ssl, limit=_MAX_HEAD_BYTES
            )
        return _Connection(reader, writer)

    async def post(self, path: str, body: bytes) -> HttpResponse:
        """POST ``body`` to ``path`` (relative to the base URL's path). No timeout here:
        callers bound the whole request with ``asyncio.timeout``."""
        conn = None
        while self._idle:
            candidate = self._idle.pop()
            if candidate.usable:
                conn = candidate
                break
            candidate.close()
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        head = (
            f"POST {self.path_prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            f"{self._fixed_head}Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        try:
            conn.writer.write(head + body)
            await conn.writer.drain()
            response, keep_alive = await self._read_response(conn.reader)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as err:
            conn.close()
            stale = isinstance(err, ConnectionResetError | BrokenPipeError) or (
                isinstance(err, asyncio.IncompleteReadError) and not err.partial
            )
            if reused and stale:
                # The server closed an idle keep-alive connection (uvicorn drops them after
                # 5 s) just as we reused it: retry once at once on a fresh socket. At worst the
                # server generates one answer twice; the item key keeps the output unique.
                return await self.post(path, body)
            raise
        except BaseException:
            conn.close()  # timeout/cancel mid-answer: the connection state is unknown
            raise
        if keep_alive:
            self._idle.append(conn)
        else:
            conn.close()
        return response

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader) -> tuple[HttpResponse, bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            version, status_text = lines[0].split(" ", 2)[:2]
            status = int(status_text)
        except ValueError as err:
            raise HttpProtocolError(f"bad status line {lines[0]!r}") from err
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" and version != "HTTP/1.0"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError as err:
                    raise HttpProtocolError(f"bad chunk size {size_line!r}") from err
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(chunks)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = await reader.read()
            keep_alive = False
        return HttpResponse(status, headers, body), keep_alive

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
