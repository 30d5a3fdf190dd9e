"""The embedded server's HTTP path against its own engine loop, side by side in one run.

(a) **engine loop**: :meth:`deepspec.serve.engine.GenerationEngine.generate` on the tokenised prompts
    (continuous batching, no HTTP), in this process;
(b) **HTTP**: ``deepspec serve`` in a subprocess (uvicorn, the real app) driven by the openai client
    (``AsyncOpenAI``, the transport ``deepspec regenerate`` uses) at ``--concurrency`` requests in
    flight, non-streaming, same prompts, same sampling (T=0.7, per-request seeds), same
    ``--max-batch-size``.

The ratio (b)/(a) of completion tokens per second is the HTTP path's efficiency. With a tiny random
target (the default) the forward is cheap, so per-request and per-token overhead of the server
dominates: that is where this bench looks. ``--profile`` records the server with py-spy (the thread holding the GIL)
(``pip install py-spy``) into ``--out``'s folder, as a text summary of the hottest functions.

CPU:  OMP_NUM_THREADS=1 python bench/serve_http.py --requests 256 --concurrency 64 --max-batch-size 32
GPU:  python bench/serve_http.py --model smollm2 --device cuda --requests 2000 --concurrency 256 \
        --max-batch-size 128 --max-tokens 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import build_random_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def messages(i: int, words: int) -> list[dict[str, str]]:
    text = " ".join(f"w{(i * 7 + j) % 2000}" for j in range(words + (i * 37) % 60))
    return [{"role": "user", "content": text}]


def answer_len(i: int, longest: int) -> int:
    """max_tokens of request ``i``: 1/4 to all of ``longest``, standing in for answers that end at
    different lengths (a random target rarely samples end-of-sequence)."""
    return longest // 4 + (i * 97) % (longest - longest // 4 + 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"deepspec serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("deepspec serve did not become healthy")


async def drive(base: str, model: str, args: argparse.Namespace) -> tuple[int, float, list[str]]:
    """All requests through the openai client, ``concurrency`` in flight; (tokens, seconds, texts)."""
    import openai

    client = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0, timeout=3600)
    limit = asyncio.Semaphore(args.concurrency)

    async def one(i: int) -> tuple[int, str]:
        async with limit:
            r = await client.chat.completions.create(
                model=model,
                messages=messages(i, args.prompt_words),
                temperature=args.temperature,
                max_tokens=answer_len(i, args.max_tokens),
                seed=i,
            )
            return r.usage.completion_tokens, r.choices[0].message.content

    await one(0)  # warm-up
    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(args.requests)))
    dt = time.perf_counter() - t0
    await client.close()
    return sum(n for n, _ in done), dt, [t for _, t in done]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF directory or 'smollm2' (default: a tiny random model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--vocab", type=int, default=2048, help="vocabulary of the random model (small: cheap forward)"
    )
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (engine and server)")
    ap.add_argument(
        "--refill-min", type=int, help="the engine's refill_min (default: its own; 1 = refill every step)"
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="engine loop and server on CPU 0, the client on CPU 1 (the client does not take the server's core)",
    )
    ap.add_argument("--profile", action="store_true", help="py-spy the server during (b)")
    ap.add_argument("--out", default="bench/results/serve_http_cpu.json")
    args = ap.parse_args()
    import torch

    from deepspec.data.template import render_prompt
    from deepspec.serve.engine import GenerationEngine
    from deepspec.serve.sampling import SamplingParams
    from deepspec.target_model.files import resolve_model_path

    torch.set_num_threads(args.threads)
    if args.pin:
        os.sched_setaffinity(0, {0})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = (
            resolve_model_path(args.model)
            if args.model
            else build_random_model(True, Path(tmp) / "m", args.vocab)
        )
        engine = GenerationEngine(
            path, device=args.device, max_batch_size=args.max_batch_size, refill_min=args.refill_min
        )
        refill_min = engine.refill_min
        prompts = [
            render_prompt(engine.tokenizer, messages(i, args.prompt_words)) for i in range(args.requests)
        ]
        params = [
            SamplingParams(args.temperature, seed=i, max_tokens=answer_len(i, args.max_tokens))
            for i in range(len(prompts))
        ]
        engine.generate(prompts[:8], params[:8])  # warm-up
        t0 = time.perf_counter()
        results = engine.generate(prompts, params)
        loop_s = time.perf_counter() - t0
        loop_tokens = sum(r.completion_tokens for r in results)
        loop_steps, loop_waves = engine.stats["steps"], engine.stats["batches"]
        del engine

        port = free_port()
        cmd = [sys.executable, "-m", "deepspec", "serve", "--model", path, "--device", args.device]
        cmd += ["--max-batch-size", str(args.max_batch_size), "--port", str(port), "--log-level", "warning"]
        cmd += ["--threads", str(args.threads), "--refill-min", str(refill_min)]
        if args.pin:
            cmd = ["taskset", "-c", "0", *cmd]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server = subprocess.Popen(cmd, env=env)
        if args.pin:
            os.sched_setaffinity(0, {1})  # the client (this process) from now on
        spy = None
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, server)
            with urllib.request.urlopen(url + "/v1/models") as r:
                model = json.load(r)["data"][0]["id"]
            if args.profile:
                pyspy = shutil.which("py-spy") or shutil.which(
                    "py-spy", path=str(Path(sys.executable).parent)
                )
                if pyspy is None:
                    raise SystemExit("--profile needs py-spy (pip install py-spy)")
                raw = out.with_suffix(".pyspy.txt")
                spy = subprocess.Popen(
                    [pyspy, "record", "--gil", "--pid", str(server.pid), "--format", "raw", "-o", str(raw)],
                    stdout=subprocess.DEVNULL,
                )
            cpu0, server0 = time.process_time(), cpu_seconds(server.pid)
            http_tokens, http_s, texts = asyncio.run(drive(url + "/v1", model, args))
            client_cpu, server_cpu = time.process_time() - cpu0, cpu_seconds(server.pid) - server0
            with urllib.request.urlopen(url + "/health") as r:
                health = json.load(r)
        finally:
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)
            server.terminate()
            server.wait(60)
    same = sum(a.text == b for a, b in zip(results, texts, strict=True))
    row = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus, torch threads {args.threads}",
        "device": args.device,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_batch_size": args.max_batch_size,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "refill_min": refill_min,
        "pinned": args.pin,
        "engine_loop": {
            "tokens": loop_tokens,
            "seconds": round(loop_s, 2),
            "tokens_per_s": round(loop_tokens / loop_s, 1),
            "steps": loop_steps,
            "prefill_waves": loop_waves,
        },
        "http": {
            "tokens": http_tokens,
            "seconds": round(http_s, 2),
            "tokens_per_s": round(http_tokens / http_s, 1),
            "server_cpu_s": round(server_cpu, 2),
            "client_cpu_s": round(client_cpu, 2),
            "server_stats": health,
        },
        "http_efficiency": round((http_tokens / http_s) / (loop_tokens / loop_s), 3),
        "same_text_as_engine_loop": f"{same}/{len(texts)}",
    }
    print(json.dumps(row, indent=2))
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
