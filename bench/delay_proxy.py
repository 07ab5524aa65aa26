"""A TCP proxy that delays every chunk by a fixed time each way: Redis (or any server) as if on
another host, for measuring what a network round trip costs the API.

    python bench/delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS     # e.g. 16390 6379 0.5 (1 ms RTT)

Loopback only (127.0.0.1 both sides). Each direction of each connection is one task that reads,
sleeps DELAY_MS, and forwards, so the delay adds to every request and every reply.
"""

from __future__ import annotations

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    try:
        while data := await reader.read(65536):
            await asyncio.sleep(delay_s)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(listen_port: int, target_port: int, delay_ms: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(_pipe(client_r, server_w, delay_ms / 1000), _pipe(server_r, client_w, delay_ms / 1000))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
