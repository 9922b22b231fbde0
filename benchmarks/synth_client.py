#!/usr/bin/env python3
"""Throughput of the synthesis chat client against a server with a fixed latency.

Starts the scripted OpenAI-compatible server (megatron_syne/synth/testing_server.py) on
127.0.0.1 with 200 ms per completion, then for each concurrency c sends ``rounds * c`` requests
with at most c in flight and reports requests/s against the ideal c / latency. Target:
>= 0.9 x ideal, i.e. the server's latency, not the client, bounds throughput. httpx (the
obvious off-the-shelf client) is measured the same way for comparison.

    python benchmarks/synth_client.py --output benchmarks/results/synth_client.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time

from megatron_syne.synth.client import ChatClient, ClientConfig
from megatron_syne.synth.testing_server import scripted_server
from megatron_syne.utils.io import atomic_open

MESSAGES = [
    {"role": "system", "content": "You are an expert teacher."},
    {
        "role": "user",
        "content": "Please gain inspiration from the following physics content.\n"
        "-----\n" + "A pendulum of length L has a period of 2 pi sqrt(L/g). " * 20,
    },
]


async def bench_client(base: str, concurrency: int, n: int) -> tuple[float, float]:
    """(requests/s, client CPU ms per request) of ChatClient."""
    async with ChatClient(
        ClientConfig([base], "bench", max_concurrency=concurrency, request_timeout=30)
    ) as client:
        await asyncio.gather(*(client.complete(MESSAGES) for _ in range(concurrency)))  # warm
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(client.complete(MESSAGES) for _ in range(n)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert all(r.attempts == 1 for r in results)
    return n / wall, 1000 * cpu / n


async def bench_httpx(base: str, concurrency: int, n: int) -> tuple[float, float]:
    import httpx

    body = json.dumps({"model": "bench", "messages": MESSAGES, "max_tokens": 2048})
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:

        async def one() -> None:
            async with slots:
                r = await http.post(f"{base}/chat/completions", content=body)
                r.json()["choices"][0]["message"]["content"]

        await asyncio.gather(*(one() for _ in range(concurrency)))
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return n / wall, 1000 * cpu / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server seconds per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--rounds", type=int, default=20, help="requests = rounds x concurrency")
    parser.add_argument("--no-httpx", action="store_true", help="skip the httpx comparison")
    parser.add_argument("--output", default=None, help="write a markdown table here")
    args = parser.parse_args()
    rows = []
    with scripted_server({"latency": args.latency}) as base:
        for c in args.concurrency:
            n = args.rounds * c
            ideal = c / args.latency
            rps, cpu_ms = asyncio.run(bench_client(base, c, n))
            row = {"c": c, "n": n, "ideal": ideal, "rps": rps, "cpu_ms": cpu_ms}
            if not args.no_httpx:
                row["httpx_rps"], row["httpx_cpu_ms"] = asyncio.run(bench_httpx(base, c, n))
            rows.append(row)
            print(
                f"concurrency {c:4d}: {rps:7.1f} req/s = {rps / ideal:.2f} x ideal {ideal:.0f} "
                f"({'PASS' if rps >= 0.9 * ideal else 'FAIL'}), client CPU {cpu_ms:.2f} ms/req"
                + (f"; httpx {row['httpx_rps']:.1f} req/s" if "httpx_rps" in row else ""),
                flush=True,
            )
    load = os.getloadavg()
    lines = [
        "# Synthesis client throughput",
        "",
        f"Machine: 2-core CPU dev machine, no GPU ({platform.processor() or platform.machine()}, "
        f"Python {sys.version.split()[0]}); load average at the end {load[0]:.1f} "
        "(the machine is shared with other jobs).",
        f"Server: `megatron_syne/synth/testing_server.py` on 127.0.0.1, fixed latency "
        f"{args.latency * 1000:.0f} ms per completion, separate process. "
        f"Requests: {args.rounds} x concurrency per row, after a warm-up round. "
        "Command: `python benchmarks/synth_client.py --output benchmarks/results/synth_client.md`.",
        "",
        "| concurrency | requests | ideal req/s (c / latency) | ChatClient req/s | x ideal | "
        "target >= 0.9 | client CPU ms/req | httpx req/s |",
        "|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['c']} | {r['n']} | {r['ideal']:.0f} | {r['rps']:.1f} | {r['rps'] / r['ideal']:.2f} "
            f"| {'pass' if r['rps'] >= 0.9 * r['ideal'] else 'FAIL'} | {r['cpu_ms']:.2f} | "
            + (f"{r['httpx_rps']:.1f} |" if "httpx_rps" in r else "- |")
        )
    lines += [
        "",
        "httpx is what this client used first; its connection pool scans every connection on "
        "each dispatch and it costs several ms of CPU per request here, so it, not the server, "
        "capped throughput. The client now uses `megatron_syne/synth/http.py` (HTTP/1.1 "
        "keep-alive on asyncio streams, one write per request).",
    ]
    if args.output:
        with atomic_open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
