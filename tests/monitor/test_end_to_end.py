"""Acceptance 4 (issue 14): the whole loop, locally, on CPU.

A tiny random target answers a few prompts greedily (its own answers, as regeneration would give),
an Eagle3 draft is trained briefly on them, and then:

1. ``deepspec eval``'s Evaluator measures the accepted length offline on a seeded canary prompt set;
2. the speculative server (:func:`deepspec.eval.serving.build_speculative_app`, what
   ``deepspec serve --draft`` runs) serves the pair; ``deepspec monitor``'s canary (the command with
   ``--once``, and its Monitor with an injected clock) reads the
   per-request statistics in vLLM's and SGLang's shapes, and its scrape mode reads the server's
   ``/metrics`` in vLLM's names: both give a live accepted length within ``TOLERANCE`` of the
   offline one (the same prompts, greedy, the same engine: the measured difference is 0);
3. the target is swapped for a perturbed one (the same weights plus noise, saved to another folder
   with another revision: what a target update does to a draft), served by the real command
   ``deepspec serve --draft`` on the same port: the live value drops to the new offline value, the
   monitor reports ``below_baseline`` and turns drift true once the drop has lasted the configured
   duration, not before (the monitor's clock is injected: nothing sleeps waiting for time to pass).

Measured (2 shared CPUs, 2026-12-02; greedy, 8 canary prompts x 32 tokens, 4 proposals, Eagle3
trained 40 steps on 24 of the target's answers): offline accepted length 2.3333 on the trained pair;
live canary (vLLM and SGLang shapes) and /metrics 2.3333 (difference 0); after the swap offline
1.3850, live 1.3850 at each of the three ticks; drift at the third tick (60 s). About 40 s in all.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deepspec.testing.tiny import _WORDS as WORDS

TOLERANCE = 0.02  # live vs offline accepted length (absolute)
PROMPTS, MAX_TOKENS, NUM_PROPOSALS = 8, 32, 4
NOISE = 0.3  # perturbation: Gaussian noise of 0.3 x each weight matrix's std


def _questions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]


def _perturbed_copy(src: str, dst: Path, noise: float) -> str:
    """The target with noise added to every weight matrix: a new revision the draft was not trained on."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen) * noise * p.std())
    model.save_pretrained(dst)
    for f in Path(src).iterdir():  # tokenizer files
        if f.name not in ("config.json", "generation_config.json") and f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return str(dst)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(recipe, draft checkpoint folder, perturbed target folder, canary prompt file)."""
    import torch

    from deepspec.config import Recipe
    from deepspec.data.template import render_prompt
    from deepspec.serve.engine import GenerationEngine
    from deepspec.serve.sampling import SamplingParams
    from deepspec.testing.tiny import save_tiny_target, tiny_recipe
    from deepspec.train.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared CPU
    root = tmp_path_factory.mktemp("e2e")
    target = save_tiny_target(str(root / "target"), "llama")
    # the target's own greedy answers: what `deepspec regenerate` would give the draft to learn
    engine = GenerationEngine(target, device="cpu", max_batch_size=24, batch_wait_ms=1.0)
    questions = _questions(24, seed=0)
    prompts = [render_prompt(engine.tokenizer, [{"role": "user", "content": q}], {}) for q in questions]
    answers = engine.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=32) for _ in questions])
    regenerated = root / "regenerated.jsonl"
    with open(regenerated, "w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a.text}]
            f.write(json.dumps({"id": f"c{i}", "status": "ok", "messages": msgs}) + "\n")
    bench = root / "benchmarks"
    bench.mkdir()
    with open(bench / "canary.jsonl", "w", encoding="utf-8") as f:  # prompts the draft never saw
        for q in _questions(12, seed=5):
            f.write(json.dumps({"turns": [q]}) + "\n")
    recipe = Recipe.model_validate(
        tiny_recipe(
            target,
            str(regenerated),
            str(root / "draft"),
            training={"max_steps": 40, "save_every": 40, "global_batch_size": 8, "micro_batch_size": 8},
            evaluation={
                "benchmarks": ["canary"],
                "benchmarks_dir": str(bench),
                "max_prompts": PROMPTS,
                "temperature": 0.0,
                "max_new_tokens": MAX_TOKENS,
                "num_proposals": NUM_PROPOSALS,
            },
        )
    )
    Trainer(recipe, device="cpu", progress=False).train()
    perturbed = _perturbed_copy(target, root / "target-r2", NOISE)
    yield recipe, str(root / "draft"), perturbed, bench / "canary.jsonl"
    torch.set_num_threads(threads)


def _offline(recipe, draft: str) -> float:
    """``deepspec eval``'s accepted length on the canary benchmark (no baseline decode)."""
    from deepspec.eval.evaluator import EvalOptions, Evaluator

    ev = Evaluator(recipe, EvalOptions(checkpoint=draft, baseline=False, progress=False, device="cpu"))
    results, _ = ev.evaluate()
    return results["canary"][0].tau


def _monitor_cli_once(base_url: str, prompts: Path, seed: int, baseline: float, capsys) -> dict:
    """``deepspec monitor --mode canary --once`` against the server: its decision as JSON."""
    from deepspec.cli import main

    capsys.readouterr()
    rc = main([
        "monitor", "--engine", "vllm", "--mode", "canary", "--base-url", base_url, "--prompts", str(prompts),
        "--num-prompts", str(PROMPTS), "--seed", str(seed), "--max-tokens", str(MAX_TOKENS),
        "--served-model", "tiny", "--baseline", str(baseline), "--min-verify-steps", "20", "--once",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out.strip().splitlines()[-1])


def _accept_length(sample) -> float:
    return 1.0 + sample.accepted_tokens / sample.verify_steps


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def _serve_cli(draft: str, model: str, port: int, log: Path) -> subprocess.Popen:
    """``deepspec serve --draft`` in a child process; returns once /health answers (or fails clearly)."""
    cmd = [
        sys.executable, "-m", "deepspec", "serve", "--model", model, "--revision", "r2", "--draft", draft,
        "--num-proposals", str(NUM_PROPOSALS), "--served-model-name", "tiny", "--device", "cpu",
        "--threads", "1", "--port", str(port), "--batch-wait-ms", "1", "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while True:  # waits on a condition: the server answering, or the process ending
        if proc.poll() is not None:
            raise AssertionError(f"deepspec serve --draft exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"deepspec serve --draft did not start in 120 s:\n{log.read_text()}")
        time.sleep(0.2)


def test_live_acceptance_follows_offline_and_drifts_after_a_target_update(pair, tmp_path, capsys):
    from deepspec.eval.serving import build_speculative_app
    from deepspec.monitor.canary import CanaryRunner, load_canary_prompts
    from deepspec.monitor.drift import Baseline, DriftPolicy, DriftState
    from deepspec.monitor.scrape import MetricsScraper
    from deepspec.monitor.service import Monitor, MonitorLabels
    from deepspec.serve.embedded import serve_app

    recipe, draft, perturbed, prompt_file = pair
    prompts = load_canary_prompts(prompt_file, PROMPTS, recipe.evaluation.shuffle_seed)
    offline = _offline(recipe, draft)
    assert offline > 2.0, f"the trained draft should accept well on its own target (tau {offline:.3f})"

    clock = Clock()
    policy = DriftPolicy(tolerance=0.1, duration_s=60, min_verify_steps=20, broken_below=1.1)
    labels = MonitorLabels("tiny", "draft-step40", "vllm", "canary")
    app = build_speculative_app(
        recipe, draft, device="cpu", max_batch_size=8, batch_wait_ms=1.0, served_model_name="tiny"
    )
    with serve_app(app) as url:
        port = int(url.rsplit(":", 1)[1])
        canary = CanaryRunner("vllm", f"{url}/v1", prompts, model="tiny", max_tokens=MAX_TOKENS)
        monitor = Monitor(
            canary, labels, policy, window_s=45, baseline=Baseline(offline, source="eval"), clock=clock
        )
        scraper = MetricsScraper("vllm", [f"{url}/metrics"], model="tiny")
        assert scraper.collect().sample is None  # the first scrape only records the counters
        status = monitor.tick()
        scraped = scraper.collect().sample  # the canary's requests, from vLLM's counters
        sglang = CanaryRunner("sglang", f"{url}/v1", prompts, model="tiny", max_tokens=MAX_TOKENS).collect()
        once = _monitor_cli_once(f"{url}/v1", prompt_file, recipe.evaluation.shuffle_seed, offline, capsys)

    live = monitor.stats.accept_length
    from_metrics, from_sglext = _accept_length(scraped), _accept_length(sglang.sample)
    print(
        f"offline {offline:.4f} live canary {live:.4f} /metrics {from_metrics:.4f} sglext {from_sglext:.4f}"
    )
    assert status.state is DriftState.OK and not status.drift
    assert abs(live - offline) <= TOLERANCE
    assert abs(from_metrics - offline) <= TOLERANCE
    assert abs(from_sglext - offline) <= TOLERANCE  # SGLang's sglext.spec_tokens_details shape
    assert monitor.stats.verify_steps == scraped.verify_steps == sglang.sample.verify_steps
    assert once["state"] == "ok" and abs(once["observed"] - offline) <= TOLERANCE  # `deepspec monitor`
    assert len(monitor.stats.position_acceptance) == NUM_PROPOSALS

    # a target update: the perturbed weights under another revision, the same draft, the same port
    swapped = recipe.model_copy(update={"target": recipe.target.model_copy(update={"model": perturbed})})
    offline_after = _offline(swapped, draft)
    assert offline_after < offline * (1 - policy.tolerance)
    server = _serve_cli(draft, perturbed, port, tmp_path / "serve.log")
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["revision"] == "r2"
        decisions = []
        for advance in (60.0, 30.0, 30.0):  # the first step empties the 45 s window of the old target
            clock.t += advance
            decisions.append(monitor.tick())
    finally:
        server.terminate()
        server.wait(30)
    first, second, third = decisions
    print(f"after the update: offline {offline_after:.4f}, live {[d.observed for d in decisions]}")
    assert abs(first.observed - offline_after) <= TOLERANCE
    assert first.state is DriftState.BELOW_BASELINE and not first.drift
    assert second.state is DriftState.BELOW_BASELINE and not second.drift  # 30 s < 60 s
    assert third.state is DriftState.DRIFT and third.drift  # below for 60 s
    assert third.ratio < 1 - policy.tolerance
