"""Overload probe: N HTTP clients (default 256) against rexnet-serve for a while, from one asyncio loop.

    python -m rexnet_serving.bench.overload --address 127.0.0.1:18080 --images DIR [--clients 256]
                                            [--seconds 20] [--backoff 0.1]

Each client sends one image per request on its own kept-alive connection, back to back; a refusal (HTTP
503, err_no 54) makes it wait ``--backoff`` seconds, as a client honouring ``Retry-After`` would, before
the next request. Prints one JSON line: accepted requests (img/s, p50/p99 latency), refused ones (count,
p99 latency), anything else (errors). Asyncio because 256 client threads would take the CPU that the
service under test needs; the requests are built once, so a client costs a few microseconds a request.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np


def _request(host: str, body: bytes) -> bytes:
    return (f"POST /rexnet/prediction HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _client(host: str, port: int, requests: List[bytes], stop_at: float, backoff: float,
                  out: Dict[str, list]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    try:
        while time.monotonic() < stop_at:
            start = time.monotonic()
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = await reader.readexactly(length)
            elapsed = time.monotonic() - start
            if status == 200 and json.loads(body).get("err_no", 0) == 0:
                out["accepted"].append(elapsed)
            elif status == 503 and json.loads(body).get("err_no") == 54:
                out["refused"].append(elapsed)
                await asyncio.sleep(backoff)
            else:
                out["errors"].append(f"HTTP {status}: {body[:120]!r}")
    except (OSError, asyncio.IncompleteReadError) as exc:
        out["errors"].append(repr(exc))
    finally:
        writer.close()


async def run(address: str, images: List[bytes], clients: int, seconds: float, backoff: float) -> dict:
    host, _, port = address.rpartition(":")
    requests = [_request(host, json.dumps({"key": ["image"], "value": [base64.b64encode(d).decode()]}).encode())
                for d in images]
    out: Dict[str, list] = {"accepted": [], "refused": [], "errors": []}
    started = time.monotonic()
    await asyncio.gather(*(_client(host, int(port), requests[i % len(requests):] + requests[:i % len(requests)],
                                   started + seconds, backoff, out) for i in range(clients)))
    window = time.monotonic() - started

    def pct(values: list, q: float) -> float:
        return round(float(np.percentile(values, q)) * 1000, 1) if values else None

    return {"clients": clients, "seconds": round(window, 1), "accepted": len(out["accepted"]),
            "accepted_img_per_s": round(len(out["accepted"]) / window, 1),
            "accepted_p50_ms": pct(out["accepted"], 50), "accepted_p99_ms": pct(out["accepted"], 99),
            "refused": len(out["refused"]), "refused_p99_ms": pct(out["refused"], 99),
            "errors": len(out["errors"]), "first_errors": out["errors"][:3]}


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rexnet_serving.bench.overload", description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True, help="host:port of rexnet-serve's HTTP port")
    parser.add_argument("--images", type=Path, required=True, help="directory of images to send")
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--backoff", type=float, default=0.1, help="seconds a refused client waits")
    args = parser.parse_args(argv)
    images = [p.read_bytes() for p in sorted(args.images.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    if not images:
        parser.error(f"no images in {args.images}")
    print(json.dumps(asyncio.run(run(args.address, images, args.clients, args.seconds, args.backoff))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
