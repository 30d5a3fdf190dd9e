"""Client throughput of `deepspec regenerate` against the local stub server.

Runs the real library path (input reading, journal with fsync, the official `openai` async client,
retries machinery, output rewrite) for N single-turn records against the stub started as a *separate
process* (so its CPU is not counted), at several stub latencies. Reports requests/s, % of the ideal
rate (concurrency / latency) and client CPU time per request (process CPU time / requests).

    python bench/regen_client.py                      # 0 and 50 ms, concurrency 256, 3000 requests
    python bench/regen_client.py --requests 5000 --latencies 0 50 100 --out bench/results/regen_client.json

`--device` is accepted for symmetry with the other benchmarks; the client is CPU-only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_stub(latency_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "deepspec.testing.stub_server",
        "--port",
        str(port),
        "--latency-ms",
        str(latency_ms),
    ]
    log = tempfile.NamedTemporaryFile("w+", prefix="stub-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)  # a file: a full pipe would stall it
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"stub did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
                ) from None
            time.sleep(0.1)


def run_one(latency_ms: float, n: int, concurrency: int, workdir: Path) -> dict:
    from deepspec.config import RegenerationConfig
    from deepspec.regenerate.runner import RegenerationJob, regenerate

    inp = workdir / f"in-{latency_ms}.jsonl"
    with open(inp, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {"id": f"b{i}", "messages": [{"role": "user", "content": f"benchmark prompt {i}"}]}
                )
                + "\n"
            )
    proc, url = start_stub(latency_ms)
    try:
        settings = RegenerationConfig(concurrency=concurrency, sampling={"max_tokens": 64, "seed": 0})
        job = RegenerationJob(
            input_path=str(inp),
            output_path=str(workdir / f"out-{latency_ms}.jsonl"),
            endpoints=[url],
            settings=settings,
            progress=False,
            restart=True,
        )
        cpu0, t0 = time.process_time(), time.perf_counter()
        summary = regenerate(job)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    requests = summary["requests"]
    rps = requests / wall
    ideal = concurrency / (latency_ms / 1000) if latency_ms else None
    return {
        "latency_ms": latency_ms,
        "concurrency": concurrency,
        "requests": requests,
        "ok": summary["ok"],
        "wall_s": round(wall, 3),
        "requests_per_s": round(rps, 1),
        "ideal_requests_per_s": round(ideal, 1) if ideal else None,
        "pct_of_ideal": round(100 * rps / ideal, 1) if ideal else None,
        "client_cpu_ms_per_request": round(1000 * cpu / requests, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--latencies", type=float, nargs="+", default=[0.0, 50.0])
    p.add_argument("--device", default="cpu", help="ignored: the client runs on CPU")
    p.add_argument("--out", default="bench/results/regen_client.json")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lat in a.latencies:
            rows.append(run_one(lat, a.requests, a.concurrency, Path(tmp)))
    print(f"{'latency':>8} {'conc':>5} {'requests':>8} {'req/s':>8} {'% ideal':>8} {'cpu ms/req':>10}")
    for r in rows:
        pct = f"{r['pct_of_ideal']:.1f}" if r["pct_of_ideal"] is not None else "-"
        print(
            f"{r['latency_ms']:>6.0f}ms {r['concurrency']:>5} {r['requests']:>8} {r['requests_per_s']:>8.1f} "
            f"{pct:>8} {r['client_cpu_ms_per_request']:>10.3f}"
        )
    result = {
        "benchmark": "regen_client",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine skews req/s
        },
        "results": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
