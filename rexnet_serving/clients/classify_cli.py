"""``rexnet-classify``: classify image files with a running service and print the top-k per file.

    rexnet-classify FILE... [--protocol http|grpc|brpc] [--address host:port] [--top-k 5] [--json]

All files go in one request. Exit codes: 0 every file classified, 1 a file was refused or the request
failed, 2 usage error (also for a file that cannot be read).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .base import DEFAULT_PORTS, PROTOCOLS, ClientError, make_client


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rexnet-classify",
                                     description="Classify image files with a running rexnet service.")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="JPEG, PNG, BMP or WebP files")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="http")
    parser.add_argument("--address", help="host:port (default 127.0.0.1 and the protocol's default port: "
                                          + ", ".join(f"{k} {v}" for k, v in DEFAULT_PORTS.items()) + ")")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    images = []
    for path in args.files:
        try:
            images.append(path.read_bytes())
        except OSError as exc:
            print(f"rexnet-classify: cannot read {path}: {exc.strerror}", file=sys.stderr)
            return 2
    address = args.address or f"127.0.0.1:{DEFAULT_PORTS[args.protocol]}"
    try:
        client = make_client(args.protocol, address, timeout=args.timeout)
        try:
            results = client.classify(images, top_k=args.top_k)
        finally:
            client.close()
    except (ClientError, ImportError) as exc:
        print(f"rexnet-classify: {args.protocol}://{address}: {exc}", file=sys.stderr)
        return 1
    for path, result in zip(args.files, results):
        if args.json:
            print(json.dumps(dict(file=str(path), **result.to_dict()), ensure_ascii=False))
        elif result.ok:
            print(f"{path}:")
            for p in result.predictions:
                print(f"  {p.score:.4f}  {p.class_id:>4}  {p.label}")
        else:
            print(f"{path}: error {result.error_code}: {result.error_message}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
