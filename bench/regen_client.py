"""Client throughput of `deepspec regenerate` against the local stub server (issue 2, acceptance 6).

Runs the real command (`python -m deepspec.cli regenerate ... --workers W`: input reading, journals
with fsync, the official `openai` async client, retries machinery, output rewrite) for N single-turn
records against `deepspec.testing.stub_server` (raw engine, S processes on one port) started as a
*separate process*, so its CPU is not counted. For each stub latency it reports:

* req/s of the sending phase (first request to last answer, over all worker processes) and % of the
  ideal rate concurrency / latency; end-to-end req/s including process start-up and output writing;
* client CPU per request: CPU time of all client processes while sending / requests (start-up
  excluded), and all client CPU including start-up (rusage of the finished command) / requests.

`--stub-capacity` first measures what the stub alone can serve with a cheap raw-socket load
generator (several processes), to show that the stub is not the bottleneck.

    python bench/regen_client.py                                  # 0 and 50 ms, concurrency 256
    python bench/regen_client.py --requests 20000 --workers 1 2 4 8 --stub-workers 4 --stub-capacity

Needs only the package's own dependencies (openai[aiohttp], uvloop).
`--device` is accepted for symmetry with the other benchmarks; the client is CPU-only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_stub(latency_ms: float, workers: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "deepspec.testing.stub_server", "--port", str(port)]
    cmd += ["--latency-ms", str(latency_ms), "--workers", str(workers)]
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - a file: a full pipe would stall the stub
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"stub did not start: {log.read()}") from None
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------------------------------
# Stub capacity: a minimal keep-alive HTTP/1.1 load generator (raw asyncio streams, several processes)
# --------------------------------------------------------------------------------------------------

_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "capacity"}], "max_tokens": 64})


async def _load(port: int, connections: int, seconds: float) -> int:
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(_BODY)}\r\n\r\n{_BODY}"
    ).encode()
    deadline = time.monotonic() + seconds
    count = 0

    async def conn() -> None:
        nonlocal count
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            count += 1
        writer.close()

    await asyncio.gather(*(conn() for _ in range(connections)))
    return count


def _load_process(port: int, connections: int, seconds: float, out: multiprocessing.Queue) -> None:
    out.put(asyncio.run(_load(port, connections, seconds)))


def stub_capacity(stub_workers: int, load_processes: int, connections: int, seconds: float = 5.0) -> dict:
    proc, port = start_stub(0.0, stub_workers)
    try:
        q: multiprocessing.Queue = multiprocessing.Queue()
        per = max(1, connections // load_processes)
        ps = [
            multiprocessing.Process(target=_load_process, args=(port, per, seconds, q))
            for _ in range(load_processes)
        ]
        for p in ps:
            p.start()
        total = sum(q.get() for _ in ps)
        for p in ps:
            p.join()
    finally:
        stop(proc)
    return {
        "stub_workers": stub_workers,
        "load_processes": load_processes,
        "connections": per * load_processes,
        "requests_per_s": round(total / seconds, 1),
    }


# --------------------------------------------------------------------------------------------------
# The client benchmark
# --------------------------------------------------------------------------------------------------


def run_one(latency_ms: float, n: int, concurrency: int, workers: int, stub_workers: int, tmp: Path) -> dict:
    inp = tmp / f"in-{n}.jsonl"
    if not inp.exists():
        with open(inp, "w") as f:
            for i in range(n):
                rec = {"id": f"b{i}", "messages": [{"role": "user", "content": f"benchmark prompt {i}"}]}
                f.write(json.dumps(rec) + "\n")
    out = tmp / f"out-{latency_ms}-{workers}.jsonl"
    proc, port = start_stub(latency_ms, stub_workers)
    cmd = [sys.executable, "-m", "deepspec.cli", "regenerate", "--input", str(inp), "--output", str(out)]
    cmd += ["--endpoint", f"http://127.0.0.1:{port}/v1", "--workers", str(workers), "--quiet", "--restart"]
    cmd += [
        "--set",
        f"regeneration.concurrency={concurrency}",
        "--set",
        "regeneration.sampling.max_tokens=64",
    ]
    cmd += ["--set", "regeneration.sampling.seed=0"]
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its workers (not the stub)
    finally:
        stop(proc)
    if done.returncode != 0:
        raise RuntimeError(f"regenerate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    s = json.loads(out.with_name(out.name.replace(".jsonl", ".summary.json")).read_text())
    requests = s["requests"]
    cpu_all = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rps = s["requests_per_s"]
    ideal = concurrency / (latency_ms / 1000) if latency_ms else None
    return {
        "latency_ms": latency_ms,
        "concurrency": concurrency,
        "workers": s.get("workers", workers),
        "stub_workers": stub_workers,
        "requests": requests,
        "ok": s["ok"],
        "send_s": s["send_s"],
        "send_start_spread_s": s.get("send_start_spread_s"),
        "send_end_spread_s": s.get("send_end_spread_s"),
        "requests_per_s": rps,
        "ideal_requests_per_s": round(ideal, 1) if ideal else None,
        "pct_of_ideal": round(100 * rps / ideal, 1) if ideal else None,
        "end_to_end_s": round(wall, 3),
        "end_to_end_requests_per_s": round(requests / wall, 1),
        "client_cpu_ms_per_request": s["client_cpu_ms_per_request"],
        "client_cpu_ms_per_request_with_startup": round(1000 * cpu_all / requests, 3),
    }


def write_result(benchmark: str, out: str, **fields: Any) -> None:
    """Write a result file: the command, date and machine (load average included), then ``fields``."""
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    result = {
        "benchmark": benchmark,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "event_loop": loop,
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine skews req/s
        },
        **fields,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--latencies", type=float, nargs="+", default=[0.0, 50.0])
    cpus = os.cpu_count() or 2
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1] + [w for w in (2, 4, 8) if w <= max(2, cpus // 2)],
        help="client processes to try (default: 1, 2, 4, 8 up to half the cores)",
    )
    p.add_argument(
        "--stub-workers", type=int, default=max(1, cpus // 4), help="stub processes (default cores/4)"
    )
    p.add_argument("--stub-capacity", action="store_true", help="also measure the stub alone")
    p.add_argument("--device", default="cpu", help="ignored: the client runs on CPU")
    p.add_argument("--out", default=str(ROOT / "bench/results/regen_client.json"))
    a = p.parse_args()

    capacity = None
    if a.stub_capacity:
        load = max(1, (os.cpu_count() or 2) - a.stub_workers)
        capacity = stub_capacity(a.stub_workers, load, a.concurrency)
        print(
            f"stub alone: {capacity['requests_per_s']:,.0f} req/s ({a.stub_workers} stub processes, "
            f"{load} load processes, {capacity['connections']} connections, 0 ms)"
        )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lat in a.latencies:
            for w in a.workers:
                rows.append(run_one(lat, a.requests, a.concurrency, w, a.stub_workers, Path(tmp)))
                r = rows[-1]
                print(f"  {lat:.0f} ms, {w} workers: {r['requests_per_s']:,.0f} req/s", file=sys.stderr)
    print(
        f"{'latency':>8} {'conc':>5} {'workers':>7} {'requests':>8} {'req/s':>8} {'% ideal':>8} "
        f"{'e2e req/s':>9} {'cpu ms/req':>10} {'+startup':>8} {'spread s':>9}"
    )
    for r in rows:
        pct = f"{r['pct_of_ideal']:.1f}" if r["pct_of_ideal"] is not None else "-"
        print(
            f"{r['latency_ms']:>6.0f}ms {r['concurrency']:>5} {r['workers']:>7} {r['requests']:>8} "
            f"{r['requests_per_s']:>8.0f} {pct:>8} {r['end_to_end_requests_per_s']:>9.0f} "
            f"{r['client_cpu_ms_per_request']:>10.3f} {r['client_cpu_ms_per_request_with_startup']:>8.3f} "
            f"{r['send_start_spread_s'] or 0:>4.1f}/{r['send_end_spread_s'] or 0:<4.1f}"
        )
    write_result("regen_client", a.out, stub_capacity=capacity, results=rows)


if __name__ == "__main__":
    main()
