"""Load on ``qwenlm serve`` over loopback: N concurrent streaming clients, and a bounded soak run.

    python benchmarks/serve_load.py                      # the demo model, 1/4/8/16 clients, 32 tokens each
    python benchmarks/serve_load.py --clients 1,8 --max-tokens 64 --rounds 2
    python benchmarks/serve_load.py --soak 300           # 5 minutes: errors and the server's resident memory

Starts the server as a subprocess on a free loopback port (or uses ``--url``), then for each client
count runs ``rounds`` requests per client, each client sending its next request when the previous one
ends. Every request streams (``stream_options.include_usage``) so time to first token (TTFT) and the gaps
between streamed chunks (inter-token latency, ITL) are measured at the client. Prints a Markdown table
and the ratio of aggregate output tokens/s at 8 clients to 1 (continuous batching should make it > 1).

The soak run keeps ``--soak-clients`` clients busy with varied prompts and lengths, a quarter of them
hanging up mid-stream, and samples the server's resident memory (VmRSS) as it goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TOPICS = ["the sea", "a lighthouse", "autumn", "a robot", "bread", "mountains", "a city at night", "rain",
          "an old clock", "the moon", "a garden", "trains", "a library", "snow", "a violin", "coffee"]  # fmt: skip


@dataclass
class Result:
    ttft: float
    gaps: list[float]
    tokens: int
    elapsed: float
    error: str | None = None


@dataclass
class Level:
    clients: int
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_request(client, url: str, prompt: str, max_tokens: int, hang_up_after: int | None = None) -> Result:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    ttft, last, gaps, tokens, chunks = None, None, [], 0, 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Result(0, [], 0, time.perf_counter() - start, f"HTTP {r.status_code}: {await r.aread()!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return Result(0, [], 0, time.perf_counter() - start, str(data["error"]))
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if data["choices"] and data["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - start
                    else:
                        gaps.append(now - last)
                    last = now
                    chunks += 1
                    if hang_up_after is not None and chunks >= hang_up_after:
                        break  # leave mid-stream: the server must free the slot
    except Exception as e:  # a benchmark counts failures instead of stopping
        return Result(0, [], 0, time.perf_counter() - start, f"{type(e).__name__}: {e}")
    return Result(ttft or 0.0, gaps, tokens, time.perf_counter() - start)


async def run_level(url: str, clients: int, rounds: int, max_tokens: int) -> Level:
    import httpx

    level = Level(clients)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def user(i: int) -> None:
            for r in range(rounds):
                prompt = f"Write a short poem about {TOPICS[(i + r) % len(TOPICS)]}."
                level.results.append(await one_request(client, url, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(user(i) for i in range(clients)))
        level.wall = time.perf_counter() - start
    return level


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def soak(url: str, pid: int, seconds: float, clients: int) -> dict:
    import httpx

    rng = random.Random(0)
    stats = {"requests": 0, "hung_up": 0, "errors": [], "tokens": 0}
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def user(i: int) -> None:
            while time.monotonic() < deadline:
                words = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(1, 30)))
                hang_up = rng.randint(1, 8) if rng.random() < 0.25 else None
                result = await one_request(client, url, f"Tell me about {words}.", rng.randint(4, 48), hang_up)
                stats["requests"] += 1
                stats["hung_up"] += hang_up is not None
                stats["tokens"] += result.tokens
                if result.error:
                    stats["errors"].append(result.error)

        async def sampler() -> None:
            start = time.monotonic()
            while time.monotonic() < deadline:
                samples.append((time.monotonic() - start, rss_bytes(pid)))
                await asyncio.sleep(5)

        await asyncio.gather(sampler(), *(user(i) for i in range(clients)))
    import httpx as _httpx

    health = _httpx.get(url + "/health").json()
    rss = [r for _, r in samples]
    # the first minute holds warm-up (allocator pools, rotary tables, cache buffers at their largest)
    settled = [r for t, r in samples if t >= min(60, seconds / 3)]
    return {**stats, "errors": stats["errors"][:5], "error_count": len(stats["errors"]), "health_after": health,
            "rss_first": rss[0], "rss_settled_min": min(settled), "rss_settled_max": max(settled), "rss_last": rss[-1],
            "samples": len(samples), "rss_mib_every_30s": [round(r / 2**20) for t, r in samples[::6]]}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, Path]:
    import httpx

    port = free_port()
    log = Path(tempfile.mkstemp(prefix="qwenlm-serve-", suffix=".log")[1])
    command = [sys.executable, "-m", "qwenlm", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
               "--dtype", args.dtype]  # fmt: skip
    if args.model:
        command += ["--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            time.sleep(0.2)


def table(levels: list[Level]) -> str:
    rows = ["| clients | requests | errors | requests/s | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for level in levels:
        ok = [r for r in level.results if not r.error]
        ttft = [r.ttft for r in ok]
        gaps = [g for r in ok for g in r.gaps]
        tokens = sum(r.tokens for r in ok)
        ms = lambda values, q: f"{percentile(values, q) * 1000:.0f} ms"
        rows.append(
            f"| {level.clients} | {len(level.results)} | {len(level.results) - len(ok)} | {len(ok) / level.wall:.2f} "
            f"| {tokens / level.wall:.1f} | {ms(ttft, 50)} | {ms(ttft, 99)} | {ms(gaps, 50)} | {ms(gaps, 99)} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder or .gguf (default: the demo model)")
    parser.add_argument("--url", help="an already running server instead of starting one")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=3, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="the server's --dtype (auto = float32 on CPU)")
    parser.add_argument("--threads", type=int, help="the server's PyTorch threads (OMP_NUM_THREADS)")
    parser.add_argument("--soak", type=float, default=0, help="run a soak test of this many seconds instead")
    parser.add_argument("--soak-clients", type=int, default=8)
    args = parser.parse_args()

    proc = None
    if args.url:
        url, pid = args.url, None
    else:
        started = time.perf_counter()
        proc, url, log = start_server(args)
        pid = proc.pid
        print(f"server up in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    try:
        import httpx

        warm = asyncio.run(run_level(url, 1, 1, 4))  # first request pays one-time costs
        if warm.results[0].error:
            raise SystemExit(f"warm-up request failed: {warm.results[0].error}")
        print(f"load average before: {os.getloadavg()[0]:.2f}; health: {httpx.get(url + '/health').json()}")
        if args.soak:
            if pid is None:
                raise SystemExit("--soak needs the server started here (to read its memory)")
            report = asyncio.run(soak(url, pid, args.soak, args.soak_clients))
            mib = lambda b: f"{b / 2**20:,.0f} MiB"
            print(json.dumps({k: v for k, v in report.items() if not k.startswith("rss_") or "every" in k}, indent=2))
            print(f"RSS: first sample {mib(report['rss_first'])}, after warm-up {mib(report['rss_settled_min'])} .. "
                  f"{mib(report['rss_settled_max'])}, last {mib(report['rss_last'])}")  # fmt: skip
            return
        levels = []
        for n in [int(c) for c in args.clients.split(",")]:
            levels.append(asyncio.run(run_level(url, n, args.rounds, args.max_tokens)))
            print(f"{n} clients done in {levels[-1].wall:.1f} s", file=sys.stderr)
        print(table(levels))
        rates = {lv.clients: sum(r.tokens for r in lv.results if not r.error) / lv.wall for lv in levels}
        if 1 in rates and 8 in rates:
            print(f"\naggregate output tok/s at 8 clients / 1 client: {rates[8] / rates[1]:.2f}x")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
            log.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
