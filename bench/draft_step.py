"""Micro-benchmark of one draft training step (target capture + draft forward/backward + AdamW) per algorithm.

CPU smoke run (tiny random target, seconds)::

    python bench/draft_step.py

CPU memory comparison (a small Qwen3-like target: hidden 256, vocab 32k; peak bytes allocated by the CPU
allocator during one profiled step, over what was allocated when the step began)::

    python bench/draft_step.py --shape small --batch 4 --seq 177 --steps 1 --warmup 1 --profile-memory
    python bench/draft_step.py --shape small --batch 4 --seq 177 --profile-memory --loss-chunk-mib 0  # one chunk

GPU run (random target with the exact Qwen3-4B shape, bf16 target, fp32 draft under bf16 autocast)::

    python bench/draft_step.py --device cuda --shape qwen3-4b --batch 16 --seq 177 --steps 10

On CUDA it also checks that DFlash/DSpark give the same loss with flex attention and with SDPA + dense mask
(same anchors), and times both. Prints a compact table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deepspec.testing.shapes import SHAPES, random_target


def make_batch(target, batch: int, seq: int, device: torch.device):
    from deepspec.models.draft import DraftBatch

    ids = torch.randint(10, target.vocab_size, (batch, seq), device=device)
    attn = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, seq // 4 :] = 1  # a prompt, then the supervised answer
    out = target.capture(ids, attn)
    return DraftBatch(ids, attn, loss_mask, out.features, out.last_hidden)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_peak_bytes(fn) -> tuple[int, object]:
    """Run ``fn()`` under the profiler; peak CPU-allocator bytes above the level when it started, and fn's result.

    The profiler's ``[memory]`` events carry the running total of bytes allocated since profiling began.
    """
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals]), result


def bench_algorithm(args, algorithm: str, device: torch.device, backend: str = "auto") -> dict:
    from deepspec.config import draft_model_config
    from deepspec.models import build_draft

    target = random_target(args.shape, device, algorithm)
    draft = build_draft(draft_model_config(algorithm=algorithm), target)
    if hasattr(draft, "attention_backend"):
        draft.attention_backend = backend
    if args.loss_chunk_mib is not None and hasattr(draft, "loss_chunk_bytes"):
        draft.loss_chunk_bytes = int(args.loss_chunk_mib * 2**20) if args.loss_chunk_mib > 0 else 2**62
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def one_step(draft=draft, target=target, opt=opt):
        batch = make_batch(target, args.batch, args.seq, device)
        with autocast:
            out = draft(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        out = one_step()
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if args.profile_memory and device.type == "cpu":
        peak_bytes, out = cpu_peak_bytes(one_step)
        peak = peak_bytes / 2**30
    row = {
        "algorithm": algorithm,
        "backend": backend,
        "step_s": step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "peak_gib": peak,
        "loss": float(out.loss.detach()),
        "trainable_params_m": sum(p.numel() for p in draft.parameters()) / 1e6,
    }
    if device.type == "cuda" and algorithm in ("dflash", "dspark"):
        row["flex_vs_sdpa_abs_diff"] = flex_vs_sdpa(draft, target, args, device)
    del draft, target, opt, one_step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def flex_vs_sdpa(draft, target, args, device) -> float:
    """Same batch and anchors through both attention paths: the losses must agree (bf16 tolerance)."""
    from deepspec.models.dflash import sample_anchors

    batch = make_batch(target, args.batch, args.seq, device)
    anchors, valid = sample_anchors(batch.supervised(), draft.cfg.num_anchors)
    losses = {}
    for backend in ("sdpa", "flex"):
        draft.attention_backend = backend
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            losses[backend] = float(draft(batch, anchors=anchors, anchor_valid=valid).loss)
    draft.attention_backend = "auto"
    return abs(losses["flex"] - losses["sdpa"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--shape", default=None, choices=sorted(SHAPES), help="default: tiny on CPU, qwen3-4b on CUDA"
    )
    p.add_argument("--algorithms", default="eagle3,dflash,dspark")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--backends", default="auto", help="DFlash/DSpark attention backends to time (auto,sdpa,flex)"
    )
    p.add_argument(
        "--profile-memory",
        action="store_true",
        help="CPU: measure the peak bytes allocated during one extra, profiled step (peak_gib column)",
    )
    p.add_argument(
        "--loss-chunk-mib",
        type=float,
        default=None,
        help="bytes of one [rows, V] fp32 chunk of the LM-head loss, in MiB (0: a single chunk; default: the "
        "draft's own default)",
    )
    p.add_argument("--out", default="bench/results/draft_step.json")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.shape = args.shape or ("qwen3-4b" if cuda else "tiny")
    args.batch = args.batch or (16 if cuda else 2)
    args.seq = args.seq or (177 if cuda else 64)
    rows = []
    for algo in args.algorithms.split(","):
        backends = args.backends.split(",") if algo != "eagle3" else ["-"]
        for backend in backends:
            rows.append(bench_algorithm(args, algo, device, backend if backend != "-" else "auto"))
            r = rows[-1]
            print(
                f"{r['algorithm']:>7} {r['backend']:>5}  step {r['step_s'] * 1e3:8.1f} ms  "
                f"{r['tokens_per_s']:9.0f} tok/s  peak {r['peak_gib']:6.2f} GiB  loss {r['loss']:.3f}"
                + (f"  |flex-sdpa| {r['flex_vs_sdpa_abs_diff']:.2e}" if "flex_vs_sdpa_abs_diff" in r else "")
            )
    meta = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "shape": args.shape,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "loss_chunk_mib": args.loss_chunk_mib,
        "peak_note": "CUDA max_memory_allocated"
        if cuda
        else "CPU: peak allocated above the step start level",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
