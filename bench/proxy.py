#!/usr/bin/env python3
"""A counting TCP proxy: every connection to 127.0.0.1:LISTEN is relayed to
TARGET, and the bytes each way are added up (TLS records, MQTT and all).

    proxy.py --target PORT

Prints `{"listening": PORT}` once it accepts connections. Each line on stdin
(any text) is answered with the totals so far:
`{"up": BYTES_TO_TARGET, "down": BYTES_FROM_TARGET, "connections": N}`.
Exits at the end of stdin.
"""

import argparse
import asyncio
import json
import sys

totals = {"up": 0, "down": 0, "connections": 0}


async def pipe(reader, writer, key):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            totals[key] += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=int, required=True)
    args = ap.parse_args()

    async def handle(client_r, client_w):
        totals["connections"] += 1
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", args.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w, "up"), pipe(server_r, client_w, "down"))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"listening": port}), flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while await stdin.readline():
        print(json.dumps(totals), flush=True)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
