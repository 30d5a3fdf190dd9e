"""Decode core on a GPU: correctness check of the CUDA-graph path, then ours vs plain transformers.

    python bench/decode_gpu.py check                 # assertions; prints CHECK PASSED
    python bench/decode_gpu.py speed --out F.json    # timing table (ours and transformers, same run)

``check`` (float32, so that the eager and graph paths are comparable token for token):
  * SmolLM2-shaped random target, n-gram drafter, T = 0: the CUDA-graph static path gives the same
    tokens as the eager dynamic-cache path, speculative and plain, at batch 1 and batch 4, and the
    batched rows equal the single-prompt results;
  * a tiny peaked target (vocabulary 8), T = 1, batch 100 in lockstep on CUDA graphs: the first
    three tokens follow the target's exact joint distribution (chi-square, p > 1e-3);
  * the batched Eagle3 drafter and the batched DFlash/DSpark block drafter
    (``deepspec/eval/block_batched.py``) on CUDA graphs (draft step and commit captured) give the same
    tokens and per-row acceptance counters as the per-row eager drafters (T = 0, batch 1 and 4), and
    the same T = 1 chi-square holds with each of them.

``speed`` (bf16, random weights of the exact shapes; an untrained draft accepts ~nothing, so round
and step times are the figures, not the speedup): plain transformers ``generate`` (dynamic cache)
against our plain decode and speculative rounds, batch 1 and batched; Eagle3 both ways: the batched
drafter (one captured draft forward for all rows) and the old per-row eager drafters.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sync() -> None:
    torch.cuda.synchronize()


def repetitive_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Prompts with repeated segments, so the n-gram drafter proposes and gets accepted."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seg = torch.randint(3, vocab, (12,), generator=gen).tolist()
        noise = torch.randint(3, vocab, (length,), generator=gen).tolist()
        out.append((seg + noise[:5]) * (length // 17) + seg)
    return out


# ------------------------------------------------------------------------------------------- check


def chi2_pvalue(samples: list[tuple[int, ...]], joint: dict[tuple[int, ...], float]) -> float:
    """Chi-square p-value of ``samples`` against the exact ``joint`` (outcomes expected < 5 times pooled)."""
    from scipy.stats import chisquare

    n_runs = len(samples)
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    big = [k for k, p in joint.items() if p * n_runs >= 5]
    obs = [counts.get(k, 0) for k in big] + [n_runs - sum(counts.get(k, 0) for k in big)]
    exp = [joint[k] * n_runs for k in big] + [n_runs - sum(joint[k] * n_runs for k in big)]
    return float(chisquare(obs, exp).pvalue)


def check() -> None:
    from deepspec.eval.drafters import NGramDrafter, RandomDrafter
    from deepspec.eval.engine import EngineConfig, SpeculativeEngine, prompt_generator
    from deepspec.testing.shapes import random_target
    from deepspec.testing.tiny import tiny_target

    dev = torch.device("cuda")
    target = random_target("smollm2", dev, "eagle3", dtype=torch.float32)
    vocab = target.vocab_size
    prompts = repetitive_prompts(4, 60, vocab, seed=1)

    def engine(kv: str) -> SpeculativeEngine:
        cfg = EngineConfig(num_proposals=7, temperature=0.0, max_new_tokens=64, kv_cache=kv)
        return SpeculativeEngine(
            target, NGramDrafter(vocab), cfg, drafter_factory=lambda: NGramDrafter(vocab)
        )

    graph, eager = engine("static"), engine("dynamic")
    want = [eager.generate(p).tokens for p in prompts]
    want_plain = [eager.generate_plain(p).tokens for p in prompts]
    got = [graph.generate(p) for p in prompts]
    assert graph.core is not None and graph.core.cuda_graphs and graph.core.graph_replays > 0
    assert [g.tokens for g in got] == want, "graph path (batch 1) differs from the eager path"
    assert [graph.generate_plain(p).tokens for p in prompts] == want_plain
    batched = graph.generate_batch(prompts)
    assert [b.tokens for b in batched] == want, "batched rows differ from single-prompt results"
    assert [b.tokens for b in graph.generate_plain_batch(prompts)] == want_plain
    tau = sum(g.stats.committed for g in got) / sum(g.stats.rounds for g in got)
    assert tau > 1.2, f"the n-gram drafter should get tokens accepted (tau {tau:.2f})"
    print(
        f"check T=0 smollm2-shape fp32: graph == eager, spec and plain, batch 1 and 4 "
        f"(tau {tau:.2f}, {graph.core.graph_replays} graph replays, shapes {graph.core.graph_shapes})"
    )

    # T = 1: distribution of the first three tokens from a peaked 8-token target, rows in lockstep
    v, prompt, n_runs, batch = 8, [1, 3, 5], 1500, 100
    tiny = tiny_target("llama", vocab=v, hidden=32, layers=2, heads=2, kv_heads=1, seed=3).to(dev)
    with torch.no_grad():
        tiny.lm_head.weight.mul_(40.0)
    joint: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(3):
        keys = list(joint)
        with torch.no_grad():
            ids = torch.tensor([prompt + list(k) for k in keys], device=dev)
            probs = torch.softmax(tiny.model(ids).logits[:, -1].float(), dim=-1).cpu()
        joint = {(*k, t): joint[k] * float(probs[i, t]) for i, k in enumerate(keys) for t in range(v)}

    def make() -> RandomDrafter:
        return RandomDrafter(v, seed=5, sharpness=1.5)

    cfg = EngineConfig(num_proposals=3, temperature=1.0, max_new_tokens=3)
    eng = SpeculativeEngine(tiny, make(), cfg, drafter_factory=make)
    samples = []
    for start in range(0, n_runs, batch):
        gens = [prompt_generator(0, "gpu-check", i, dev) for i in range(start, start + batch)]
        samples += [tuple(r.tokens[:3]) for r in eng.generate_batch([prompt] * batch, gens)]
    assert eng.core is not None and eng.core.cuda_graphs and eng.core.graph_replays > 0
    pvalue = chi2_pvalue(samples, joint)
    assert pvalue > 1e-3, f"T=1 samples do not follow the target (p = {pvalue:.2e})"
    print(f"check T=1 tiny peaked target, batch {batch} on CUDA graphs: chi-square p = {pvalue:.3f} (> 1e-3)")
    for algorithm in ("eagle3", "dflash", "dspark"):
        check_batched_drafter(algorithm, target, prompts, tiny, prompt, joint)
    print("CHECK PASSED")


def batched_test_draft(algorithm: str, target):
    """A random draft of ``algorithm`` for ``target``; DSpark's Markov head gets random W2 (it starts at
    zero) so that its sequential bias takes part in the comparison."""
    from deepspec.config import draft_model_config
    from deepspec.models import build_draft

    torch.manual_seed(0)
    draft = build_draft(draft_model_config(algorithm=algorithm), target).eval()
    if algorithm == "dspark":
        with torch.no_grad():
            w2 = draft.markov_head.markov_w2.weight
            w2.copy_(torch.randn(w2.shape, generator=torch.Generator().manual_seed(2)).to(w2) * 0.5)
    return draft


def check_batched_drafter(algorithm: str, target, prompts, tiny, prompt, joint) -> None:
    """The batched ``algorithm`` drafter (Eagle3: :mod:`deepspec.eval.eagle3_batched`, DFlash/DSpark:
    :mod:`deepspec.eval.block_batched`) on CUDA graphs against per-row eager drafters (T = 0: same
    tokens and per-row acceptance counters), and at T = 1 (chi-square against the exact joint)."""
    from deepspec.eval.engine import EngineConfig, SpeculativeEngine, prompt_generator

    draft = batched_test_draft(algorithm, target)
    cfg = EngineConfig(num_proposals=7, temperature=0.0, max_new_tokens=64)
    fast = SpeculativeEngine(target, draft.as_drafter(target), cfg)
    slow = SpeculativeEngine(
        target,
        draft.as_drafter(target),
        replace(cfg, batched_drafter=False, cuda_graphs=False),
        drafter_factory=lambda: draft.as_drafter(target),
    )
    for batch in (1, 4):
        got = fast.generate_batch(prompts[:batch])
        want = slow.generate_batch(prompts[:batch])
        assert [r.tokens for r in got] == [r.tokens for r in want], f"batched {algorithm}, batch {batch}"
        assert [(r.stats.rounds, r.stats.accepted) for r in got] == [
            (r.stats.rounds, r.stats.accepted) for r in want
        ], f"batched {algorithm}, batch {batch}: per-row acceptance differs"
    assert fast._batched is not None and slow._batched is None, f"the batched {algorithm} drafter did not run"
    bdraft = fast._batched[1]
    assert bdraft.cuda_graphs and bdraft.graph_replays > 0, f"the batched {algorithm} step was not captured"
    print(
        f"check T=0 batched {algorithm} on CUDA graphs == per-row eager {algorithm}, batch 1 and 4 "
        f"({bdraft.graph_replays} draft graph replays, shapes {bdraft.graph_shapes})"
    )
    n_runs, batch = 1500, 100
    tiny_draft = batched_test_draft(algorithm, tiny)
    eng = SpeculativeEngine(
        tiny, tiny_draft.as_drafter(tiny), EngineConfig(num_proposals=3, temperature=1.0, max_new_tokens=3)
    )
    samples = []
    for start in range(0, n_runs, batch):
        gens = [prompt_generator(0, f"gpu-check-{algorithm}", i, "cuda") for i in range(start, start + batch)]
        samples += [tuple(r.tokens[:3]) for r in eng.generate_batch([prompt] * batch, gens)]
    assert eng._batched is not None, f"the batched {algorithm} drafter did not run at T = 1"
    assert eng._batched[1].cuda_graphs and eng._batched[1].graph_replays > 0
    pvalue = chi2_pvalue(samples, joint)
    assert pvalue > 1e-3, (
        f"T=1 samples with the batched {algorithm} drafter do not follow the target (p = {pvalue:.2e})"
    )
    print(
        f"check T=1 batched {algorithm} on CUDA graphs, batch {batch}: chi-square p = {pvalue:.3f} (> 1e-3)"
    )


# ------------------------------------------------------------------------------------------- speed


def hf_generate_tps(target, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Plain transformers ``generate`` (greedy, dynamic cache), every row forced to ``new_tokens``."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, target.vocab_size, (batch, prompt_len), generator=gen).cuda()
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    target.model.generate(
        ids[:, :16],
        attention_mask=torch.ones_like(ids[:, :16]),
        **{**kw, "max_new_tokens": 4, "min_new_tokens": 4},
    )
    sync()
    t0 = time.perf_counter()
    target.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    sync()
    wall = time.perf_counter() - t0
    return {
        "batch": batch,
        "tokens_per_s": round(batch * new_tokens / wall, 1),
        "ms_per_step": round(wall / new_tokens * 1e3, 3),
    }


def ours(engine, prompts: list[list[int]], spec: bool) -> dict:
    """One lockstep batch (after a warm-up batch of the same shape, so graphs are captured)."""
    run = engine.generate_batch if spec else engine.generate_plain_batch
    keep = engine.config.max_new_tokens
    engine.config.max_new_tokens = 8  # warm-up: captures the step graphs of this batch size
    run(prompts)
    engine.config.max_new_tokens = keep
    sync()
    t0 = time.perf_counter()
    results = run(prompts)
    sync()
    wall = time.perf_counter() - t0
    rounds = max(r.stats.rounds for r in results)
    new = sum(r.stats.new_tokens for r in results)
    decode = sum(r.stats.decode_seconds for r in results)
    return {
        "batch": len(prompts),
        "tokens_per_s": round(new / decode, 1),
        "ms_per_round": round(decode / rounds * 1e3, 3),
        "tau": round(sum(r.stats.committed for r in results) / sum(r.stats.rounds for r in results), 3),
        "wall_s": round(wall, 3),
    }


def speed(args: argparse.Namespace) -> dict:
    from deepspec.config import draft_model_config
    from deepspec.eval.drafters import NGramDrafter
    from deepspec.eval.engine import EngineConfig, SpeculativeEngine
    from deepspec.models import build_draft
    from deepspec.testing.shapes import random_target

    dev = torch.device("cuda")
    rows: list[dict] = []
    for shape in args.shapes.split(","):
        target = random_target(shape, dev, "eagle3")
        torch.manual_seed(0)
        draft = build_draft(draft_model_config(algorithm="eagle3"), target).to(dtype=target.dtype).eval()
        gen = torch.Generator().manual_seed(1)
        pool = [
            torch.randint(3, target.vocab_size, (args.prompt_len,), generator=gen).tolist() for _ in range(64)
        ]
        cfg = EngineConfig(
            num_proposals=7, temperature=0.0, max_new_tokens=args.new_tokens, stop_token_ids=()
        )
        eagle = SpeculativeEngine(  # the old path: one eager per-row drafter per row
            target,
            draft.as_drafter(target),
            replace(cfg, batched_drafter=False),
            drafter_factory=lambda d=draft, t=target: d.as_drafter(t),
        )
        eagle_batched = SpeculativeEngine(target, draft.as_drafter(target), cfg)  # one draft forward, graphs
        ngram = SpeculativeEngine(
            target,
            NGramDrafter(target.vocab_size),
            cfg,
            drafter_factory=lambda v=target.vocab_size: NGramDrafter(v),
        )
        batches = [int(b) for b in (args.batches if shape == "smollm2" else "1").split(",")]
        for b in batches:
            first = len(rows)
            prompts = pool[:b]
            rows.append(
                {
                    "shape": shape,
                    "what": "transformers generate (plain)",
                    **hf_generate_tps(target, b, args.prompt_len, args.new_tokens),
                }
            )
            rows.append({"shape": shape, "what": "ours plain", **ours(eagle, prompts, spec=False)})
            if b <= args.max_eagle_batch:  # one eager drafter per row: slow at large batch
                rows.append(
                    {
                        "shape": shape,
                        "what": "ours spec eagle3 (untrained)",
                        **ours(eagle, prompts, spec=True),
                    }
                )
            rows.append(
                {
                    "shape": shape,
                    "what": "ours spec eagle3 batched (untrained)",
                    **ours(eagle_batched, prompts, spec=True),
                    "draft_graphs": len(eagle_batched._batched[1].graph_shapes),
                }
            )
            rows.append({"shape": shape, "what": "ours spec ngram", **ours(ngram, prompts, spec=True)})
            for r in rows[first:]:
                print(json.dumps(r), flush=True)
        if args.profile and shape == "smollm2":
            from torch.profiler import ProfilerActivity, profile

            tables = []
            for name, run in (
                ("eagle3 (untrained) speculative, batch 1", eagle.generate_batch),
                ("batched eagle3 (untrained) speculative, batch 1", eagle_batched.generate_batch),
                ("plain decode, batch 1", eagle.generate_plain_batch),
            ):
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    run(pool[:1])
                    sync()
                table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
                tables.append(f"== {name}: {args.new_tokens} new tokens ==\n{table}")
                print(tables[-1][:3000])
            Path(args.profile).write_text("\n\n".join(tables), encoding="utf-8")
        del eagle, eagle_batched, ngram, draft, target
        torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "num_proposals": 7,
            "dtype": "bf16",
        },
        "rows": rows,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    sp = sub.add_parser("speed")
    sp.add_argument("--shapes", default="smollm2,qwen3-4b")
    sp.add_argument("--batches", default="1,8,32,64")
    sp.add_argument("--max-eagle-batch", type=int, default=32)
    sp.add_argument("--prompt-len", type=int, default=87)
    sp.add_argument("--new-tokens", type=int, default=128)
    sp.add_argument("--profile", help="write a torch.profiler table of one batch-1 eagle3 generation here")
    sp.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    if args.cmd == "check":
        check()
        return 0
    result = speed(args)
    print(f"{'shape':<9} {'what':<38} {'B':>3} {'tok/s':>10} {'ms/round':>9} {'tau':>6}")
    for r in result["rows"]:
        print(
            f"{r['shape']:<9} {r['what']:<38} {r['batch']:>3} {r['tokens_per_s']:>10.1f} {r.get('ms_per_round', r.get('ms_per_step')):>9.3f} {r.get('tau', 1.0):>6.3f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
