#!/usr/bin/env python3
"""Readiness probe for the dev-stack Kafka broker (Python 3 stdlib only).

Sends one raw Kafka Metadata v1 request (asking for no topics) over TCP and
exits 0 only if a well-formed response listing at least one broker comes back.

    python3 scripts/devstack/kafka_ping.py [--host 127.0.0.1] [--port 9092]
                                           [--timeout 3] [--quiet]

Exit codes: 0 ready, 1 not ready (connection refused, timeout, malformed
response, no brokers), 2 usage error.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys

API_KEY_METADATA = 3
API_VERSION = 1  # v1: brokers carry a rack, response carries controller_id
CORRELATION_ID = 0x6D656470  # "medp"
CLIENT_ID = b"medpipe-devstack-ping"
MAX_RESPONSE = 16 * 1024 * 1024


class Malformed(Exception):
    pass


class Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise Malformed(f"truncated response at byte {self.pos} (wanted {n})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def int8(self) -> int:
        return struct.unpack(">b", self._take(1))[0]

    def int16(self) -> int:
        return struct.unpack(">h", self._take(2))[0]

    def int32(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def string(self, nullable: bool = False) -> str | None:
        n = self.int16()
        if n == -1 and nullable:
            return None
        if n < 0:
            raise Malformed(f"bad string length {n}")
        return self._take(n).decode("utf-8", "replace")

    def array_len(self) -> int:
        n = self.int32()
        if n < 0 or n > 1_000_000:
            raise Malformed(f"bad array length {n}")
        return n

    def done(self) -> bool:
        return self.pos == len(self.buf)


def build_request() -> bytes:
    # Request header v1: api_key, api_version, correlation_id, client_id.
    header = struct.pack(">hhi", API_KEY_METADATA, API_VERSION, CORRELATION_ID)
    header += struct.pack(">h", len(CLIENT_ID)) + CLIENT_ID
    # Metadata v1 body: topics array; an EMPTY array means "no topics"
    # (null would mean "all topics"). We only need the broker list.
    body = struct.pack(">i", 0)
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = sock.recv(min(n, 65536))
        if not chunk:
            raise Malformed("connection closed before the full response arrived")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def parse_response(buf: bytes) -> tuple[list[tuple[int, str, int]], int]:
    r = Reader(buf)
    corr = r.int32()  # response header v0
    if corr != CORRELATION_ID:
        raise Malformed(f"correlation id mismatch: {corr:#x}")
    brokers = []
    for _ in range(r.array_len()):
        node_id = r.int32()
        host = r.string()
        port = r.int32()
        r.string(nullable=True)  # rack
        brokers.append((node_id, host or "", port))
    controller_id = r.int32()
    for _ in range(r.array_len()):  # topics (we asked for none, but be lenient)
        r.int16()  # error_code
        r.string()  # name
        r.int8()  # is_internal
        for _ in range(r.array_len()):  # partitions
            r.int16()  # error_code
            r.int32()  # partition_index
            r.int32()  # leader_id
            for _ in range(r.array_len()):  # replica_nodes
                r.int32()
            for _ in range(r.array_len()):  # isr_nodes
                r.int32()
    if not r.done():
        raise Malformed(f"{len(buf) - r.pos} unexpected trailing bytes")
    return brokers, controller_id


def ping(host: str, port: int, timeout: float) -> tuple[list[tuple[int, str, int]], int]:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(build_request())
        (size,) = struct.unpack(">i", recv_exact(sock, 4))
        if size < 4 or size > MAX_RESPONSE:
            raise Malformed(f"implausible response size {size}")
        return parse_response(recv_exact(sock, size))


def main() -> int:
    ap = argparse.ArgumentParser(description="Kafka readiness probe (Metadata v1).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9092)
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    args = ap.parse_args()

    try:
        brokers, controller_id = ping(args.host, args.port, args.timeout)
    except (OSError, Malformed, struct.error) as exc:
        if not args.quiet:
            print(f"kafka_ping: {args.host}:{args.port} not ready: {exc}", file=sys.stderr)
        return 1
    if not brokers:
        if not args.quiet:
            print(f"kafka_ping: {args.host}:{args.port} answered but lists no brokers yet", file=sys.stderr)
        return 1
    if not args.quiet:
        listed = ", ".join(f"{n}@{h}:{p}" for n, h, p in brokers)
        print(f"kafka_ping: ok, brokers [{listed}], controller {controller_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
