"""Benchmark (issue: explanation service): bounded load test of `bentoml serve services.explanations:Explanations`
on loopback, against a real MLflow server holding a real 64² explanation (the default generator width, ngf 32,
z 64; 10 GAN steps: image quality is irrelevant to timing).

Prints, with the targets, and writes ``benchmarks/results/service_load.json``:
  * cached published sequence (GET .../components/1/sequence.gif) with ``wrk`` (Debian package ``wrk``) at 4 and
    32 connections, --duration s each: p50 / p90 / p99 / max, req/s (targets: p99 < 20 ms at 4, < 50 ms at 32)
  * the same with the asyncio + aiohttp client: closed loop at --clients and open loop at --rate req/s (latency
    from each request's scheduled start)
  * on-demand 16-frame 64² sequence (POST /v1/generate, GIF), one client: p50 / p99 (target p99 <= 150 ms)
  * the service's RSS (every process of `bentoml serve`: the arbiter and its worker) after --generations distinct
    on-demand sequences spread over --versions published versions, under a model budget of --model-budget MiB
  * with the generation queue full (--gen-clients clients generating beyond the queue): the cached GIF's p99
    (wrk, 4 connections), the share of generation requests answered 503 + Retry-After, the accepted ones' p99
  * whether adaptive batching would pay: generator time per image at batch 16 (one request) vs 64 (four merged)

    .venv/bin/python benchmarks/service_load.py [--duration 10] [--versions 20] [--generations 200]"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from results_file import provenance, write_results     # noqa: E402 (benchmarks/ is on sys.path)

RESULTS = REPO / "benchmarks" / "results" / "service_load.json"


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


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    """wrk's '1.23ms' / '850.00us' / '1.02s' in milliseconds."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m[1]) * _UNIT_MS[m[2]]


def wrk(url: str, connections: int, duration: float, threads: int = 2) -> dict:
    """``wrk --latency`` against ``url``: p50 / p75 / p90 / p99 / max in ms, req/s, errors (non-2xx + socket)."""
    out = subprocess.run(["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration:g}s",
                          "--latency", url], capture_output=True, text=True, check=True).stdout
    pcts = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return {"connections": connections, **{f"p{q}_ms": _ms(v) for q, v in pcts.items()},
            "max_ms": _ms(re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)[1]),
            "req_per_s": float(re.search(r"Requests/sec:\s+([0-9.]+)", out)[1]), "errors": errors}


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants."""
    proc = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])


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


async def flood(url: str, clients: int, duration: float, body: dict, headers: dict) -> dict:
    """``clients`` loops POSTing ``body`` for ``duration`` s: latencies of the accepted (200) requests and how many
    were refused with 503 (and whether each carried Retry-After)."""
    ok, refused, with_retry_after, other = [], 0, 0, 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), headers=headers) as session:
        stop = time.perf_counter() + duration

        async def client() -> None:
            nonlocal refused, with_retry_after, other
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                async with session.post(url, json=body) as resp:
                    await resp.read()
                    if resp.status == 200:
                        ok.append(time.perf_counter() - t0)
                    elif resp.status == 503:
                        refused += 1
                        with_retry_after += "Retry-After" in resp.headers
                        await asyncio.sleep(0.05)           # a polite client backs off a little
                    else:
                        other += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return {"accepted": len(ok), "refused_503": refused, "refused_with_retry_after": with_retry_after,
            "other_errors": other, "accepted_p50_ms": pct(ok, 50), "accepted_p99_ms": pct(ok, 99)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=200.0, help="open-loop request rate (req/s)")
    ap.add_argument("--ondemand", type=int, default=60, help="sequential on-demand requests")
    ap.add_argument("--versions", type=int, default=20, help="published versions (for the RSS measurement)")
    ap.add_argument("--generations", type=int, default=200, help="distinct on-demand sequences for the RSS")
    ap.add_argument("--model-budget", type=int, default=5,
                    help="FIGAN_SERVICE_MODEL_CACHE_BYTES as this many versions' generator + PLS state")
    ap.add_argument("--gen-queue", type=int, default=4, help="FIGAN_SERVICE_GEN_QUEUE")
    ap.add_argument("--gen-clients", type=int, default=16, help="generating clients when the queue is full")
    a = ap.parse_args()

    from models import layout
    from models.cgan import load_generator
    from models.explain import ExplainConfig
    from models.pls import load_pls
    from service_platform import API_KEY, MODEL, Platform
    from services.caches import tensor_bytes

    cfg = ExplainConfig(steps=10, ckpt_every=10, batch_size=16, fid_samples=32, fid_extractor="randconv",
                        n_components=2, regressor_steps=10)
    figures: dict[str, float | int] = {}
    with tempfile.TemporaryDirectory(prefix="figan-bench-service-") as tmp:
        platform = Platform.start(Path(tmp), cfg=cfg, size=64, serve=())
        try:
            versions = ["1"] + [platform.new_version() for _ in range(a.versions - 1)]
            for v in versions[1:]:
                platform.publish(v)
            per_version = (tensor_bytes(load_generator(platform.artifacts / layout.GENERATOR_DIR)[0])
                           + tensor_bytes(load_pls(platform.artifacts / layout.PLS_DIR)))
            budget = a.model_budget * per_version
            figures.update({"model_bytes_per_version": per_version, "model_budget_bytes": budget})
            served = platform.serve(FIGAN_SERVICE_PUBLIC_READ="true", FIGAN_SERVICE_LISTING_TTL="5",   # default TTL
                                    FIGAN_SERVICE_GEN_QUEUE=str(a.gen_queue),
                                    FIGAN_SERVICE_MODEL_CACHE_BYTES=str(budget))
            gif = f"{served.url}/v1/models/{MODEL}/versions/champion/components/1/sequence.gif"
            asyncio.run(load(gif, 4, 2.0))                                        # warm up: download + cache
            gc.collect()
            gc.freeze()         # this process imported torch/MLflow for the set-up: its full GCs stalled the client
            print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} "
                  f"CPUs (a shared machine: other work competes with the server and the client)")
            figures["load_average_before"] = round(os.getloadavg()[0], 2)
            for conns in (4, 32):
                cpu0 = cpu_s(served.proc.pid)
                r = wrk(gif, conns, a.duration)
                r["cpu_ms_per_request"] = (cpu_s(served.proc.pid) - cpu0) * 1000 / max(1, r["req_per_s"] * a.duration)
                figures.update({f"cached_gif_wrk_c{conns}_{k}": v for k, v in r.items() if k != "connections"})

            lat, err, elapsed = asyncio.run(load(gif, a.clients, a.duration))
            figures.update({f"cached_gif_aiohttp_closed_c{a.clients}_p50_ms": pct(lat, 50),
                            f"cached_gif_aiohttp_closed_c{a.clients}_p99_ms": pct(lat, 99),
                            f"cached_gif_aiohttp_closed_c{a.clients}_req_per_s": len(lat) / elapsed,
                            f"cached_gif_aiohttp_closed_c{a.clients}_errors": err})
            lat, err = asyncio.run(paced(gif, a.clients, a.rate, a.duration))
            figures.update({f"cached_gif_open_{a.rate:g}rps_p50_ms": pct(lat, 50),
                            f"cached_gif_open_{a.rate:g}rps_p99_ms": pct(lat, 99),
                            f"cached_gif_open_{a.rate:g}rps_errors": err})

            url, key = f"{served.url}/v1/generate", {"X-API-Key": API_KEY}
            body = {"model": MODEL, "version": "champion", "components": [1], "frames": 16, "format": "gif"}
            asyncio.run(sequential(url, [body] * 3, key))                                   # warm up
            lat, err = asyncio.run(sequential(url, [{**body, "seed": i} for i in range(a.ondemand)], key))
            figures.update({"ondemand_16f_p50_ms": pct(lat, 50), "ondemand_16f_p99_ms": pct(lat, 99),
                            "ondemand_16f_mean_ms": statistics.mean(lat) * 1000, "ondemand_16f_errors": err})

            figures["service_rss_mb_before_generations"] = round(rss_mb(served.proc.pid), 1)
            step = max(1, a.generations // 4)
            for start in range(0, a.generations, step):
                bodies = [{**body, "version": versions[i % len(versions)], "seed": 1000 + i}
                          for i in range(start, min(start + step, a.generations))]
                lat, err = asyncio.run(sequential(url, bodies, key))
                figures[f"service_rss_mb_after_{start + len(bodies)}_generations"] = round(rss_mb(served.proc.pid), 1)
                figures["generations_errors"] = figures.get("generations_errors", 0) + err

            loop_result: dict = {}

            async def queue_full() -> None:
                flood_task = asyncio.create_task(flood(url, a.gen_clients, a.duration + 2, body, key))
                await asyncio.sleep(1.0)                                    # the queue fills
                loop_result["wrk"] = await asyncio.to_thread(wrk, gif, 4, a.duration)
                loop_result["flood"] = await flood_task

            asyncio.run(queue_full())
            figures.update({f"queue_full_cached_gif_wrk_c4_{k}": v for k, v in loop_result["wrk"].items()
                            if k != "connections"})
            figures.update({f"queue_full_generate_{k}": v for k, v in loop_result["flood"].items()})

            one, four = batching_check(platform.artifacts / layout.GENERATOR_DIR)
            figures.update({"generator_ms_per_image_batch16": one, "generator_ms_per_image_batch64": four})
        finally:
            platform.stop()
    write_results(RESULTS, {**provenance(),
                            "config": {"resolution": 64, "duration_s": a.duration, "versions": a.versions,
                                       "generations": a.generations, "model_budget_versions": a.model_budget,
                                       "gen_concurrency": 1, "gen_queue": a.gen_queue, "gen_clients": a.gen_clients,
                                       "listing_ttl_s": 5},
                            "targets": {"cached_gif_wrk_c4_p99_ms": 20, "cached_gif_wrk_c32_p99_ms": 50,
                                        "ondemand_16f_p99_ms": 150},
                            "figures": {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}})


if __name__ == "__main__":
    main()
