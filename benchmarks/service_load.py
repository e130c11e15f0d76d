"""Benchmark (issue: explanation service): bounded load test of `bentoml serve services.explanations:Explanations`
on loopback, against a real MLflow server holding a real 64² explanation (the default generator width, ngf 32,
z 64; 10 GAN steps: image quality is irrelevant to timing).

Prints, with the targets:
  * cached published sequence (GET .../components/1/sequence.gif), --clients connections, --duration s each:
    closed loop (every client sends its next request on the answer: the saturation throughput; latency is then
    clients / throughput by construction) and open loop at --rate req/s (latency from each request's scheduled
    start): p50 / p99 latency, req/s, errors (targets: p99 <= 50 ms, >= 200 req/s, 0 errors)
  * on-demand 16-frame 64² sequence (POST /v1/generate, GIF), one client: p50 / p99 (target p99 <= 150 ms)
  * the service's RSS (every process of `bentoml serve`: the arbiter and its worker)
  * whether adaptive batching would pay: generator time per image at batch 16 (one request) vs 64 (four merged)

The load client is asyncio + aiohttp with fixed concurrency and duration, on the same machine as the server.

    .venv/bin/python benchmarks/service_load.py [--clients 32] [--duration 10] [--rate 200] [--ondemand 60]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


async def _ok(request) -> bool:
    """Send one request (an aiohttp request context) and read the body; True for a 200."""
    try:
        async with request as resp:
            await resp.read()
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def load(url: str, clients: int, duration: float, method: str = "GET", json: dict | None = None,
               headers: dict | None = None) -> tuple[list[float], int, float]:
    """``clients`` loops requesting ``url`` for ``duration`` s: (latencies in s, errors, elapsed s)."""
    lat: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, headers=headers) as session:
        stop = time.perf_counter() + duration

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                if await _ok(session.request(method, url, json=json)):
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return lat, errors, time.perf_counter() - t0


async def sequential(url: str, bodies: list[dict], headers: dict) -> tuple[list[float], int]:
    """POST each body in turn: (latencies in s, errors)."""
    lat, errors = [], 0
    async with aiohttp.ClientSession(headers=headers) as session:
        for body in bodies:
            t0 = time.perf_counter()
            async with session.post(url, json=body) as resp:
                await resp.read()
                if resp.status == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1
    return lat, errors


async def paced(url: str, clients: int, rate: float, duration: float) -> tuple[list[float], int]:
    """Open loop: ``rate`` req/s in total, spread evenly over ``clients`` connections, for ``duration`` s.

    Latency is measured from each request's *scheduled* start, so a server that falls behind shows it (no
    coordinated omission)."""
    lat: list[float] = []
    errors = 0
    period = clients / rate
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        t0 = time.perf_counter() + 0.1

        async def client(k: int) -> None:
            nonlocal errors
            n = 0
            while (due := t0 + k / rate + n * period) < t0 + duration:
                n += 1
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                if await _ok(session.get(url)):
                    lat.append(time.perf_counter() - due)
                else:
                    errors += 1

        await asyncio.gather(*(client(k) for k in range(clients)))
    return lat, errors


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (MB): `bentoml serve` and its worker."""
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2 ** 20


def batching_check(gan_dir: Path, frames: int = 16, merged: int = 4, repeats: int = 15) -> tuple[float, float]:
    """Generator ms per image as the service runs it (``services.render.sweep_frames``, channels_last, one torch
    thread): one request's batch (``frames``) vs ``merged`` requests merged into one batch, best of ``repeats``."""
    import torch

    from models.cgan import load_generator
    from services.render import sweep_frames

    torch.set_num_threads(1)
    G, cfg, _ = load_generator(gan_dir)
    G = G.to(memory_format=torch.channels_last)
    values = np.linspace(-2, 2, frames)

    def per_image(n_requests: int) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sweep_frames(G, cfg, [0] * n_requests, values, 0, np.zeros(cfg.k))
            times.append(time.perf_counter() - t0)
        return min(times) / (frames * n_requests) * 1000

    return per_image(1), per_image(merged)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=200.0, help="open-loop request rate (req/s)")
    ap.add_argument("--ondemand", type=int, default=60, help="sequential on-demand requests")
    a = ap.parse_args()

    from models.explain import ExplainConfig
    from service_platform import API_KEY, MODEL, Platform

    cfg = ExplainConfig(steps=10, ckpt_every=10, batch_size=16, fid_samples=32, fid_extractor="randconv",
                        n_components=2, regressor_steps=10)
    with tempfile.TemporaryDirectory(prefix="figan-bench-service-") as tmp:
        env = {"FIGAN_SERVICE_PUBLIC_READ": "true", "FIGAN_SERVICE_LISTING_TTL": "5"}     # the default TTL
        platform = Platform.start(Path(tmp), cfg=cfg, size=64, serve=(env,))
        try:
            served = platform.served[0].wait_ready()
            gif = f"{served.url}/v1/models/{MODEL}/versions/champion/components/1/sequence.gif"
            asyncio.run(load(gif, 4, 2.0))                                        # warm up: download + cache
            gc.collect()
            gc.freeze()         # this process imported torch/MLflow for the set-up: its full GCs stalled the client
            print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} "
                  f"CPUs (a shared machine: other work competes with the server and the client)")
            lat, err, elapsed = asyncio.run(load(gif, a.clients, a.duration))
            print(f"cached sequence GIF, closed loop, {a.clients} clients, {a.duration:g} s: p50 {pct(lat, 50):.1f} "
                  f"ms, p99 {pct(lat, 99):.1f} ms, {len(lat) / elapsed:.0f} req/s, {err} errors")
            lat, err = asyncio.run(paced(gif, a.clients, a.rate, a.duration))
            print(f"cached sequence GIF, open loop {a.rate:g} req/s over {a.clients} clients, {a.duration:g} s: "
                  f"p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms, {len(lat)} requests, {err} errors "
                  f"(targets: p99 <= 50 ms at >= 200 req/s, 0 errors)")

            url, key = f"{served.url}/v1/generate", {"X-API-Key": API_KEY}
            body = {"model": MODEL, "version": "champion", "components": [1], "frames": 16, "format": "gif"}
            asyncio.run(sequential(url, [body] * 3, key))                                   # warm up
            lat, err = asyncio.run(sequential(url, [{**body, "seed": i} for i in range(a.ondemand)], key))
            print(f"on-demand 16-frame 64² GIF, 1 client, {a.ondemand} requests: p50 {pct(lat, 50):.1f} ms, "
                  f"p99 {pct(lat, 99):.1f} ms, mean {statistics.mean(lat) * 1000:.1f} ms, {err} errors "
                  f"(target p99 <= 150 ms)")
            lat, err, elapsed = asyncio.run(load(url, 4, a.duration / 2, "POST", body, key))
            print(f"on-demand, 4 clients, {a.duration / 2:g} s: p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} "
                  f"ms, {len(lat) / elapsed:.1f} req/s, {err} errors")
            print(f"service RSS (bentoml serve + its worker): {rss_mb(served.proc.pid):.0f} MB")
            one, four = batching_check(platform.artifacts / "gan" / "best")
            print(f"adaptive batching check, generator ms per image: one 16-frame request {one:.2f}, four merged "
                  f"(batch 64) {four:.2f}")
        finally:
            platform.stop()


if __name__ == "__main__":
    main()
