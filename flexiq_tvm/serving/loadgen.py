"""An open-loop load generator for any KServe v2 endpoint (`flexiq serve`, the Ray Serve example).

Open loop: every request is sent at its scheduled arrival time (a seeded trace from `sim`),
whether or not earlier ones were answered, and its latency is counted from that scheduled time,
so a slow server cannot slow the offered load down (no coordinated omission). asyncio with raw
HTTP/1.1 keep-alive connections keeps the client's own cost low: on a small machine the client
shares the cores with the server, which is why every live result says where it ran.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Optional, Sequence
from urllib.parse import urlsplit

import numpy as np


def binary_infer_request(host: str, path: str, x: np.ndarray, keep_alive: bool = True) -> bytes:
    """A complete HTTP request carrying `x` with the KServe binary tensor extension (as tritonclient)."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    body = head + raw
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode() + body


async def _read_response(reader):
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def _ratio_of(headers, body) -> float:
    hl = headers.get("inference-header-content-length")
    head = body[: int(hl)] if hl is not None else body
    try:
        return float(json.loads(head)["parameters"]["flexiq_ratio"])
    except (ValueError, KeyError, TypeError):
        return float("nan")


async def _open_loop(host, port, path, arrivals, payloads, max_conns, timeout, progress):
    n = len(arrivals)
    lat = np.full(n, np.nan)
    status = np.zeros(n, dtype=np.int32)
    ratio = np.full(n, np.nan)
    idle: list = []
    sem = asyncio.Semaphore(max_conns)
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    t0 = 0.0

    async def one(i):
        await go.wait()                 # the clock starts once every task exists (creating thousands
        await asyncio.sleep(max(0.0, t0 + arrivals[i] - loop.time()))   # of them takes a while)
        async with sem:
            conn = idle.pop() if idle else None
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                reader, writer = conn
                writer.write(payloads[i % len(payloads)])
                await writer.drain()
                st, headers, body = await asyncio.wait_for(_read_response(reader), timeout)
                lat[i] = loop.time() - (t0 + arrivals[i])
                status[i] = st
                if st == 200:
                    ratio[i] = _ratio_of(headers, body)
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                else:
                    idle.append(conn)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
                status[i] = -1
                if conn is not None:
                    conn[1].close()
        if progress is not None:
            progress.update(1)

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    await asyncio.sleep(0)
    t0 = loop.time() + 0.05
    go.set()
    await asyncio.gather(*tasks)
    for _, w in idle:
        w.close()
    return lat, status, ratio


def run_open_loop(url: str, model: str, arrivals: Sequence[float], inputs: np.ndarray, max_conns: int = 256,
                  timeout_s: float = 30.0, progress: bool = True) -> dict:
    """Sends request i (one sample, `inputs[i % len(inputs)]`) at `arrivals[i]` seconds from now.

    Returns per request: latency (s, NaN on failure), HTTP status (-1: no answer) and the ratio the
    server reports having used; plus the wall time the run took.
    """
    from tqdm.auto import tqdm

    u = urlsplit(url if "//" in url else "http://" + url)
    host, port = u.hostname, u.port or 80
    path = f"/v2/models/{model}/infer"
    payloads = [binary_infer_request(f"{host}:{port}", path, inputs[i:i + 1]) for i in range(len(inputs))]
    bar = tqdm(total=len(arrivals), desc=f"open loop {len(arrivals)} req", unit="req", leave=False,
               disable=not progress)
    t = time.perf_counter()
    try:
        lat, status, ratio = asyncio.run(_open_loop(host, port, path, np.asarray(arrivals, np.float64), payloads,
                                                    max_conns, timeout_s, bar))
    finally:
        bar.close()
    return {"latency": lat, "status": status, "ratio": ratio, "wall_s": time.perf_counter() - t,
            "arrivals": np.asarray(arrivals, np.float64)}


def summarize_live(res: dict, slo_s: float, accuracy: Optional[dict] = None) -> dict:
    """The same figures as `sim.summarize`, from a live run (failed requests count as SLO misses)."""
    lat, ok = res["latency"], res["status"] == 200
    good = lat[ok]
    out = {"requests": int(lat.size), "ok": int(ok.sum()), "failed": int((~ok).sum()),
           "offered_rate": float((lat.size - 1) / (res["arrivals"][-1] - res["arrivals"][0])) if lat.size > 1 else 0.0}
    if good.size:
        out.update({"p50_ms": float(np.percentile(good, 50) * 1e3), "p90_ms": float(np.percentile(good, 90) * 1e3),
                    "p99_ms": float(np.percentile(good, 99) * 1e3), "mean_ms": float(good.mean() * 1e3)})
    out["slo_attainment"] = float(np.sum(ok & (lat <= slo_s)) / max(lat.size, 1))
    r = res["ratio"][ok]
    levels = sorted(set(float(v) for v in r if np.isfinite(v)))
    out["served_share"] = {repr(v): float(np.mean(r == v)) for v in levels}
    if accuracy and r.size and all(v in accuracy for v in levels):
        out["accuracy_served"] = float(np.mean([accuracy[float(v)] for v in r]))
    return out
