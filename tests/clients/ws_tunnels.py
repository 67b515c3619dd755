"""Drives WebSocket tunnels through a gateway with the `websockets` library, for tests/tunnels.rs.

    ws_tunnels.py URL N [--prefix P]

Opens N tunnels to URL/ws?id=<P><i>, sends one text message on each and prints one JSON line
{"ready": {id: server}} once every tunnel has echoed. Then it reads commands from stdin, one a line:

    watch SECONDS   keep every tunnel talking (a message each 200 ms) for SECONDS and print
                    {"closed": {id: [code, seconds_after_start]}, "alive": {id: server}}
    reopen          open a new tunnel for every id whose tunnel was closed and print
                    {"reopened": {id: server}}
    quit            close everything and exit
"""
import asyncio
import json
import sys
import time

import websockets


async def echo_server(ws, text):
    await ws.send(text)
    reply = json.loads(await ws.recv())
    return reply["server"]


async def main():
    url, n = sys.argv[1], int(sys.argv[2])
    prefix = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--prefix" else ""
    ids = [f"{prefix}{i}" for i in range(n)]
    socks = {}

    async def open_one(key):
        ws = await websockets.connect(f"{url}/ws?id={key}", open_timeout=10, ping_interval=None)
        return ws, await echo_server(ws, f"hello {key}")

    opened = await asyncio.gather(*(open_one(k) for k in ids))
    ready = {}
    for key, (ws, server) in zip(ids, opened):
        socks[key] = ws
        ready[key] = server
    print(json.dumps({"ready": ready}), flush=True)

    loop = asyncio.get_running_loop()
    closed = {}
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "quit":
            break
        cmd = line.split()
        if cmd[0] == "watch":
            seconds = float(cmd[1])
            start = time.monotonic()
            alive = {}

            async def talk(key, ws):
                server = None
                try:
                    while time.monotonic() - start < seconds:
                        server = await echo_server(ws, f"ping {key}")
                        await asyncio.sleep(0.2)
                    alive[key] = server
                except websockets.ConnectionClosed as e:
                    code = e.rcvd.code if e.rcvd is not None else None
                    closed[key] = [code, round(time.monotonic() - start, 3)]

            await asyncio.gather(*(talk(k, ws) for k, ws in socks.items() if k not in closed))
            print(json.dumps({"closed": closed, "alive": alive}), flush=True)
        elif cmd[0] == "reopen":
            again = [k for k in closed]
            opened = await asyncio.gather(*(open_one(k) for k in again))
            reopened = {}
            for key, (ws, server) in zip(again, opened):
                socks[key] = ws
                reopened[key] = server
            closed.clear()
            print(json.dumps({"reopened": reopened}), flush=True)
    await asyncio.gather(*(ws.close() for ws in socks.values()), return_exceptions=True)


asyncio.run(main())
