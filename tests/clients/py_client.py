"""A Python websockets client for ringgate's tests (tests/real_clients.rs).

Usage:
  py_client.py echo URL [--no-compression]        echo text and binary up to 1 MiB, verified
  py_client.py subscribe URL COUNT [--no-compression]
                                                  print "ready", then each of COUNT messages
                                                  received as one line (T:<text> or B:<hex>)

websockets offers permessage-deflate by default (client_max_window_bits); --no-compression
offers nothing. The first line printed is always `extensions: <names>` once connected.
For wss:// URLs, Python's ssl module verifies the server against the CA in the file named by
RINGGATE_TEST_CA (the tests' own CA).
"""
import asyncio
import os
import ssl
import sys

import websockets


def compression(args):
    return None if "--no-compression" in args else "deflate"


def tls(url):
    """The TLS context for a wss:// URL: the tests' CA, hostname checked (Python's defaults)."""
    if not url.startswith("wss://"):
        return None
    return ssl.create_default_context(cafile=os.environ["RINGGATE_TEST_CA"])


def json_text(size, seed):
    item = '{"seq":%d,"user":"u%d","event":"tick","price":1234.5},' % (seed, seed % 7)
    return (item * (size // len(item) + 1))[:size]


async def echo(url, args):
    async with websockets.connect(url, max_size=2**21, compression=compression(args), ssl=tls(url)) as ws:
        names = [type(e).__name__ for e in ws.protocol.extensions]
        print("extensions:", ",".join(names) or "none", flush=True)
        for i, size in enumerate([0, 1, 125, 126, 200, 4096, 65535, 65536, 300000, 1 << 20]):
            text = json_text(size, i)
            await ws.send(text)
            got = await ws.recv()
            assert got == text, "text of %d bytes came back as %d" % (size, len(got))
            data = os.urandom(size // 2) + bytes(size - size // 2)  # half noise, half zeros
            await ws.send(data)
            got = await ws.recv()
            assert got == data, "binary of %d bytes came back as %d" % (size, len(got))
        print("echo ok", flush=True)


async def subscribe(url, count, args):
    async with websockets.connect(url, max_size=2**21, compression=compression(args), ssl=tls(url)) as ws:
        names = [type(e).__name__ for e in ws.protocol.extensions]
        print("extensions:", ",".join(names) or "none", flush=True)
        print("ready", flush=True)
        for _ in range(count):
            message = await asyncio.wait_for(ws.recv(), timeout=20)
            if isinstance(message, str):
                print("T:" + message, flush=True)
            else:
                print("B:" + message.hex(), flush=True)


def main():
    command, url, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    if command == "echo":
        asyncio.run(echo(url, rest))
    elif command == "subscribe":
        asyncio.run(subscribe(url, int(rest[0]), rest[1:]))
    else:
        sys.exit("unknown command " + command)


main()
