"""Per-request latency of ONE regeneration client process (the ceiling behind `--workers`).

`bench/regen_client.py` measures the whole command; this script isolates one event loop. It drives
`deepspec.regenerate.endpoints.EndpointPool` (the official `openai` client over the aiohttp
transport, our retries) with C concurrent lanes against `deepspec.testing.stub_server` started as a
separate process, and reports req/s, client CPU per request, the client-side latency percentiles
(p50/p90/p99; the stub itself adds exactly its configured latency) and the event-loop lag (how late
a 5 ms timer fires: the time a ready request waits for the loop). When the lag grows the process is
CPU-bound and more concurrency in it only adds latency: that is when `--workers N` helps.

    python bench/regen_latency.py                                   # 50 ms, concurrency 16 32 64
    python bench/regen_latency.py --latency-ms 50 --concurrency 32 64 128 --requests 10000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from regen_client import start_stub, stop, write_result  # noqa: E402

from deepspec.regenerate.endpoints import EndpointPool  # noqa: E402


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


async def measure(port: int, concurrency: int, requests: int) -> dict:
    pool = EndpointPool([f"http://127.0.0.1:{port}/v1"], concurrency=concurrency)
    await pool.start()
    latencies: list[float] = []
    lags: list[float] = []
    sending = True

    async def lag_monitor() -> None:
        while sending:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t - 0.005)

    todo = list(range(requests))

    async def lane() -> None:
        while todo:
            i = todo.pop()
            t = time.perf_counter()
            c = await pool.complete(
                [{"role": "user", "content": f"benchmark prompt {i}"}],
                key=f"b{i}",
                model="stub",
                params={"max_tokens": 64},
                extra_body={},
            )
            latencies.append(time.perf_counter() - t)
            if c.error is not None:
                raise RuntimeError(f"request {i} failed: {c.error}")

    monitor = asyncio.ensure_future(lag_monitor())
    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    sending = False
    await monitor
    await pool.close()
    q = statistics.quantiles(latencies, n=100)
    lq = statistics.quantiles(lags, n=100)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "requests_per_s": round(requests / wall, 1),
        "client_cpu_ms_per_request": round(1000 * cpu / requests, 3),
        "latency_ms": {"p50": _ms(q[49]), "p90": _ms(q[89]), "p99": _ms(q[98])},
        "loop_lag_ms": {"p50": _ms(lq[49]), "p99": _ms(lq[98])},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--stub-workers", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench/results/regen_latency.json"))
    a = p.parse_args()

    from deepspec.regenerate.send import install_uvloop

    install_uvloop()
    rows = []
    for c in a.concurrency:
        proc, port = start_stub(a.latency_ms, a.stub_workers)
        try:
            rows.append(asyncio.run(measure(port, c, a.requests)))
        finally:
            stop(proc)
        r = rows[-1]
        ideal = c / (a.latency_ms / 1000) if a.latency_ms else None
        r["pct_of_ideal"] = round(100 * r["requests_per_s"] / ideal, 1) if ideal else None
        print(
            f"conc {c:>4}: {r['requests_per_s']:>8,.0f} req/s"
            + (f" ({r['pct_of_ideal']:.1f} % of ideal)" if ideal else "")
            + f", {r['client_cpu_ms_per_request']:.3f} ms CPU/req, latency p50/p90/p99 "
            f"{r['latency_ms']['p50']}/{r['latency_ms']['p90']}/{r['latency_ms']['p99']} ms, "
            f"loop lag p50/p99 {r['loop_lag_ms']['p50']}/{r['loop_lag_ms']['p99']} ms"
        )
    write_result(
        "regen_latency", a.out, stub_latency_ms=a.latency_ms, stub_workers=a.stub_workers, results=rows
    )


if __name__ == "__main__":
    main()
