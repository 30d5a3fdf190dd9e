"""Losslessness of the engine on tiny random targets: greedy identity and T=1 distribution (chi-square)."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from deepspec.eval.drafters import NGramDrafter, RandomDrafter
from deepspec.eval.engine import EngineConfig, SpeculativeEngine, prompt_generator, prompt_seed
from deepspec.eval.scheduler import CostCurve, PrefixScheduler
from deepspec.testing.tiny import tiny_target

from .conftest import TargetCopyDrafter, reference_greedy

PROMPTS = [[1, 5, 9, 17, 33, 5, 9], [1, 40, 41, 42], [1, 7]]


@pytest.mark.parametrize("kv_cache", ["static", "dynamic"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("drafter_name", ["copy", "random", "ngram"])
def test_greedy_identical_to_target(arch, drafter_name, kv_cache):
    target = tiny_target(arch)
    vocab = target.vocab_size
    make = {
        "copy": lambda: TargetCopyDrafter(target.model),
        "random": lambda: RandomDrafter(vocab, seed=1),
        "ngram": lambda: NGramDrafter(vocab),
    }[drafter_name]
    cfg = EngineConfig(num_proposals=4, temperature=0.0, max_new_tokens=24, kv_cache=kv_cache)
    engine = SpeculativeEngine(target, make(), cfg, drafter_factory=make)
    wants = [reference_greedy(target.model, prompt, 24) for prompt in PROMPTS]
    for prompt, want in zip(PROMPTS, wants, strict=True):
        got = engine.generate(prompt)
        assert got.tokens == want
        assert engine.generate_plain(prompt).tokens == want
        assert got.finish_reason == "length"
        assert got.stats.rounds >= 1 and 1.0 <= got.stats.tau <= 5.0
    if drafter_name == "copy":  # the copy drafter accepts several tokens per round
        assert got.stats.tau > 1.5
    if kv_cache == "static":  # B prompts of different lengths in lockstep: every row as when alone
        assert [r.tokens for r in engine.generate_batch(PROMPTS)] == wants
        assert [r.tokens for r in engine.generate_plain_batch(PROMPTS)] == wants


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_rows_equal_single_prompt_results(tiny_llama_target, temperature):
    """Per-row acceptance and per-row random streams: a row's result does not depend on its neighbours."""
    target = tiny_llama_target
    make = lambda: RandomDrafter(target.vocab_size, seed=1, sharpness=0.5)  # noqa: E731
    stops = tuple(range(0, target.vocab_size, 9))  # rows end after different numbers of rounds
    cfg = EngineConfig(num_proposals=3, temperature=temperature, max_new_tokens=16, stop_token_ids=stops)
    engine = SpeculativeEngine(target, make(), cfg, drafter_factory=make)
    prompts = [*PROMPTS, [1, 2], [3, 4, 5, 6, 7, 8, 9, 10]]

    def gens():
        return [prompt_generator(0, "rows", i) for i in range(len(prompts))]

    single = [engine.generate(p, g) for p, g in zip(prompts, gens(), strict=True)]
    batched = engine.generate_batch(prompts, gens())
    for one, row in zip(single, batched, strict=True):
        assert (row.tokens, row.finish_reason) == (one.tokens, one.finish_reason)
        assert (row.stats.rounds, row.stats.accepted) == (one.stats.rounds, one.stats.accepted)
    plain_single = [engine.generate_plain(p, g).tokens for p, g in zip(prompts, gens(), strict=True)]
    assert [r.tokens for r in engine.generate_plain_batch(prompts, gens())] == plain_single
    assert len({len(r.tokens) for r in batched}) > 1  # rows really stop at different rounds


def test_stop_token_and_max_new_tokens(tiny_llama_target):
    target = tiny_llama_target
    prompt = PROMPTS[0]
    full = reference_greedy(target.model, prompt, 20)
    stop = full[5]
    first = full.index(stop)
    cfg = EngineConfig(num_proposals=5, temperature=0.0, max_new_tokens=20, stop_token_ids=(stop,))
    out = SpeculativeEngine(target, TargetCopyDrafter(target.model), cfg).generate(prompt)
    assert out.tokens == full[: first + 1] and out.finish_reason == "stop"
    cfg = EngineConfig(num_proposals=7, temperature=0.0, max_new_tokens=3)
    out = SpeculativeEngine(target, TargetCopyDrafter(target.model, corrupt_every=100), cfg).generate(prompt)
    assert out.tokens == full[:3] and out.finish_reason == "length"


def test_prompt_seed_is_stable():
    assert prompt_seed(0, "gsm8k", 3) == prompt_seed(0, "gsm8k", 3)
    assert prompt_seed(0, "gsm8k", 3) != prompt_seed(0, "gsm8k", 4) != prompt_seed(1, "gsm8k", 3)
    a = torch.rand(3, generator=prompt_generator(0, "x", 1))
    b = torch.rand(3, generator=prompt_generator(0, "x", 1))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- T = 1


V = 8
PROMPT = [1, 3, 5]


@pytest.fixture(scope="module")
def peaked_target():
    """A tiny-vocabulary target with a peaked (far from uniform) next-token distribution."""
    target = tiny_target("llama", vocab=V, hidden=32, layers=2, heads=2, kv_heads=1, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(40.0)
    return target


@torch.no_grad()
def exact_joint(target, prompt, n_tokens: int) -> dict[tuple[int, ...], float]:
    """Exact target distribution of the first ``n_tokens`` sampled tokens (T=1) by enumeration."""
    joint: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n_tokens):
        keys = list(joint)
        ids = torch.tensor([prompt + list(k) for k in keys])
        probs = torch.softmax(target.model(ids).logits[:, -1].float(), dim=-1)
        joint = {(*k, v): joint[k] * float(probs[i, v]) for i, k in enumerate(keys) for v in range(V)}
    return joint


def chi2_pvalue(samples: list[tuple[int, ...]], joint: dict[tuple[int, ...], float]) -> float:
    n = len(samples)
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    big = [k for k, p in joint.items() if p * n >= 5]
    obs = [counts.get(k, 0) for k in big]
    exp = [joint[k] * n for k in big]
    rest_obs = n - sum(obs)
    rest_exp = n - sum(exp)
    if rest_exp > 1e-9:
        obs.append(rest_obs)
        exp.append(rest_exp)
    return float(chisquare(obs, exp).pvalue)


def sample_engine(engine, n_runs: int, n_tokens: int, tag: str, batch: int = 1) -> list[tuple[int, ...]]:
    out = []
    for start in range(0, n_runs, batch):
        gens = [prompt_generator(0, tag, i) for i in range(start, min(start + batch, n_runs))]
        if batch == 1:
            results = [engine.generate(PROMPT, gens[0])]
        else:  # rows in lockstep: every row must still be an exact target sample
            results = engine.generate_batch([PROMPT] * len(gens), gens)
        out.extend(tuple(res.tokens[:n_tokens]) for res in results)
    return out


N_RUNS = 1500


@pytest.mark.parametrize(
    ("mode", "kv_cache", "batch"),
    [
        ("plain", "dynamic", 1),
        ("plain", "static", 1),
        ("plain", "static", 50),
        ("threshold+scheduler", "dynamic", 1),
        ("threshold+scheduler", "static", 25),
    ],
)
def test_t1_output_distribution_equals_target(peaked_target, mode, kv_cache, batch):
    target = peaked_target
    joint = exact_joint(target, PROMPT, 3)
    sched = None
    if mode == "plain":
        make = lambda: RandomDrafter(V, seed=5, sharpness=1.5)  # noqa: E731
        cfg = EngineConfig(num_proposals=3, temperature=1.0, max_new_tokens=3, kv_cache=kv_cache)
    else:
        make = lambda: RandomDrafter(V, seed=5, sharpness=1.5, confidence=True)  # noqa: E731
        # a cost curve that makes the scheduler keep 0..3 slots depending on the confidences
        sched = PrefixScheduler(CostCurve([1.0, 1.3, 1.6, 1.9]))
        cfg = EngineConfig(
            num_proposals=3, temperature=1.0, max_new_tokens=3, confidence_threshold=0.3, kv_cache=kv_cache
        )
    engine = SpeculativeEngine(target, make(), cfg, scheduler=sched, drafter_factory=make)
    samples = sample_engine(engine, N_RUNS, 3, f"{mode}-{kv_cache}", batch)
    # first token comes from the prefill; tokens 2-3 from verification rounds
    assert chi2_pvalue(samples, joint) > 1e-3
    assert chi2_pvalue([s[1:] for s in samples], _marginal(joint, (1, 2))) > 1e-3
    if sched is not None:
        assert len(set(sched.decisions)) > 1, "the scheduler should truncate to different lengths"


def _marginal(joint, positions):
    out: dict[tuple[int, ...], float] = {}
    for k, p in joint.items():
        key = tuple(k[i] for i in positions)
        out[key] = out.get(key, 0.0) + p
    return out


def test_chi2_detects_a_biased_sampler(peaked_target):
    """Power check: samples from the draft-biased 'always accept' rule are rejected by the same test."""
    target = peaked_target
    joint = exact_joint(target, PROMPT, 2)
    drafter = RandomDrafter(V, seed=5, sharpness=1.5)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(N_RUNS):
        # x1 from the target, x2 from the draft (what a sampler that accepts everything would commit)
        p1 = torch.tensor([joint_marg for joint_marg in _marginal(joint, (0,)).values()])
        x1 = int(torch.multinomial(p1, 1, generator=gen))
        x2 = int(torch.multinomial(drafter.table[x1], 1, generator=gen))
        samples.append((x1, x2))
    assert chi2_pvalue(samples, joint) < 1e-3


def test_keys_enumeration_sanity(peaked_target):
    joint = exact_joint(peaked_target, PROMPT, 2)
    assert sum(joint.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(joint) == set(itertools.product(range(V), repeat=2))
