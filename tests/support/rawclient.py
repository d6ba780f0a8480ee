"""A deliberately stalled stream client: it sends one request (a WebSocket upgrade or an SSE GET) with a tiny
receive buffer and then reads nothing until the test asks — the slow consumer the server must drop."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct


class StalledClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, path: str, websocket: bool = True,
                   headers: dict[str, str] | None = None) -> "StalledClient":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a tiny TCP window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
        if websocket:
            key = base64.b64encode(os.urandom(16)).decode()
            lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                      "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        return cls(reader, writer)

    async def head(self) -> bytes:
        """The response head (status line and headers)."""
        return await self.reader.readuntil(b"\r\n\r\n")

    async def read_to_end(self) -> bytes:
        """Read what the server sent, until it closes the connection."""
        chunks = []
        while chunk := await self.reader.read(65536):
            chunks.append(chunk)
        return b"".join(chunks)

    async def websocket_close(self) -> tuple[int, str, int]:
        """Read frames until the server's close frame: (close code, reason, text frames before it)."""
        count = 0
        while True:
            b0, b1 = await self.reader.readexactly(2)
            size = b1 & 0x7F
            if size == 126:
                size = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await self.reader.readexactly(size)
            if b0 & 0x0F == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return code, payload[2:].decode(errors="replace"), count
            if b0 & 0x0F == 0x1:
                count += 1

    def close(self) -> None:
        self.writer.transport.abort()
