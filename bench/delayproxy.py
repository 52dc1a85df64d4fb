"""A TCP proxy that delays every byte by a fixed time in each direction, preserving order and
throughput (data in flight is queued, not serialised behind the delay).

    python -m bench.delayproxy LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_MS
"""
from __future__ import annotations

import asyncio
import sys
import time

BUF = 256 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.write_eof() if writer.can_write_eof() else writer.close()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send(), name="delayproxy-send")
    try:
        while True:
            data = await reader.read(BUF)
            queue.put_nowait((time.monotonic() + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, asyncio.CancelledError):
        sender.cancel()
    finally:
        writer.close()


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(*target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pump(cr, sw, delay), _pump(sr, cw, delay), return_exceptions=True)

    server = await asyncio.start_server(handle, *listen, limit=BUF)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    listen, target, delay_ms = _addr(sys.argv[1]), _addr(sys.argv[2]), float(sys.argv[3])
    asyncio.run(_serve(listen, target, delay_ms / 1000))


if __name__ == "__main__":
    main()
