"""Acceptance 1: the monitor against fake SGLang and vLLM endpoints over real HTTP.

Acceptance declines over simulated time (the clock is injected; nothing sleeps). The monitor must
follow the served value, turn drift true once the window value has stayed below the threshold
for the configured duration and not before, stay out of drift without traffic, and not fake a drop
when the server restarts (counters back to 0, SGLang running averages restarting).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from monitor_fakes import EngineServer, FakeClock, FakeSGLang, FakeVLLM, FakeVLLMNoSpec

from deepspec.monitor.drift import Baseline, DriftPolicy, DriftState, load_baseline
from deepspec.monitor.scrape import MetricsScraper
from deepspec.monitor.service import Monitor, MonitorLabels

POLICY = DriftPolicy(tolerance=0.1, duration_s=600, min_verify_steps=100, broken_below=1.1)
WINDOW_S, TICK_S, STEPS = 300.0, 60.0, 120
BASELINE = 3.0


def served_value(t: float) -> float:
    """3.0 for 20 min, then a linear decline to 2.2 over 20 min, then flat."""
    if t < 1200:
        return 3.0
    return max(2.2, 3.0 - 0.8 * (t - 1200) / 1200)


class Engine:
    """One fake engine and what it has served per tick (steps, accepted draft tokens)."""

    def __init__(self, engine: str, mode: str) -> None:
        self.engine = engine
        self.fake = FakeVLLM() if engine == "vllm" else FakeSGLang(mode)

    def serve(self, value: float, steps: int = STEPS) -> tuple[float, float]:
        if isinstance(self.fake, FakeVLLM):  # integer accepted counts: mix floor/ceil steps
            lo = math.floor(value - 1.0)
            hi_steps = round((value - 1.0 - lo) * steps)
            self.fake.serve_steps(steps - hi_steps, lo)
            if hi_steps:
                self.fake.serve_steps(hi_steps, lo + 1)
            return steps, (steps - hi_steps) * lo + hi_steps * (lo + 1)
        self.fake.serve_steps(steps, value)
        return steps, steps * (value - 1.0)


def expected_window(history: list[tuple[float, float, float]], now: float) -> tuple[float | None, float]:
    """Accepted length and verification steps of what was served inside the window."""
    inside = [(s, a) for t, s, a in history if t > now - WINDOW_S and s > 0]
    steps = sum(s for s, _ in inside)
    return (1.0 + sum(a for _, a in inside) / steps if steps else None), steps


MODES = [("vllm", ""), ("sglang", "interval"), ("sglang", "cumulative"), ("sglang", "counters")]


@pytest.mark.parametrize(
    ("engine", "mode"), MODES, ids=["vllm", "sglang-interval", "sglang-cumulative", "sglang-counters"]
)
def test_monitor_follows_a_decline_and_drifts_after_the_duration(engine: str, mode: str) -> None:
    eng = Engine(engine, mode)
    clock = FakeClock()
    t0 = clock()
    gauges = "cumulative" if mode == "cumulative" else "auto"  # auto must find interval / counters itself
    with EngineServer(metrics=eng.fake.metrics) as srv:
        scraper = MetricsScraper(engine, [srv.url + "/metrics"], "qwen3-8b", sglang_gauges=gauges)  # type: ignore[arg-type]
        labels = MonitorLabels("qwen3-8b", "run-1", engine, "scrape")
        mon = Monitor(scraper, labels, POLICY, WINDOW_S, Baseline(BASELINE, "run-1"), clock=clock)
        history: list[tuple[float, float, float]] = []  # (scrape time, steps, accepted) served before it
        below_since = None
        for i in range(int(4200 / TICK_S)):
            t = i * TICK_S
            clock.t = t0 + t
            steps = acc = 0.0
            if t in (600.0, 900.0):  # the server restarts (counters and running averages from 0)...
                eng.fake.restart()
                if t == 900.0:  # ...and serves more than before the restart: only _created tells
                    steps, acc = eng.serve(3.0, steps=STEPS * 40)
            if i > 0:  # the first scrape only records the counters
                s, a = eng.serve(served_value(t))
                steps, acc = steps + s, acc + a
            status = mon.tick()
            history.append((clock.t, steps, acc))
            want, want_steps = expected_window(history, clock.t)
            stats = mon.stats
            assert stats is not None
            # every served step is attributed, restarts included (a restarted counter counts from 0)
            assert stats.verify_steps == pytest.approx(want_steps, rel=1e-6), (t, status)
            if want is None:
                assert stats.accept_length is None
            else:
                assert stats.accept_length == pytest.approx(want, rel=1e-6), (t, status)
            if want is not None and stats.verify_steps >= POLICY.min_verify_steps and want < BASELINE * 0.9:
                below_since = below_since if below_since is not None else clock.t
            else:
                below_since = None
            should_drift = below_since is not None and clock.t - below_since >= POLICY.duration_s
            assert status.drift is should_drift, (t, status)
            if t < 1200:  # restarts included: never below the baseline before the decline
                assert status.state in (DriftState.OK, DriftState.INSUFFICIENT_DATA), (t, status)
        assert status.drift  # the decline ended in drift...
        assert below_since is not None and below_since - t0 > 1200  # ...after it started
        assert status.observed == pytest.approx(2.2, rel=2e-3)
        if engine == "vllm":  # 2.2 = 1.2 accepted per step: position 0 always, position 1 in 20 %
            assert stats.position_acceptance == pytest.approx((1.0, 0.2, 0.0), abs=1e-9)
            assert stats.acceptance_ratio == pytest.approx(1.2 / 3)

        # traffic stops: the window empties, no decision, drift turns off (SGLang keeps its stale gauge)
        for _ in range(10):
            clock.advance(TICK_S)
            status = mon.tick()
        assert status.state is DriftState.INSUFFICIENT_DATA and not status.drift


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_no_traffic_never_drifts(engine: str) -> None:
    fake = FakeVLLM() if engine == "vllm" else FakeSGLang("interval")
    if engine == "sglang":
        fake.serve_steps(50, 1.5)  # one small burst long ago: the gauge stays at 1.5, far below baseline
    clock = FakeClock()
    with EngineServer(metrics=fake.metrics) as srv:
        scraper = MetricsScraper(engine, [srv.url + "/metrics"])  # type: ignore[arg-type]
        mon = Monitor(scraper, MonitorLabels("m", "d", engine, "scrape"), POLICY, WINDOW_S, None, clock=clock)
        states = set()
        for _ in range(120):  # two hours
            states.add(mon.tick().state)
            clock.advance(TICK_S)
    assert states == {DriftState.INSUFFICIENT_DATA}


def test_non_speculative_servers_and_a_dead_endpoint() -> None:
    clock = FakeClock()
    labels = MonitorLabels("m", "d", "sglang", "scrape")
    plain = FakeSGLang("interval", speculative=False)
    with EngineServer(metrics=plain.metrics) as srv:
        mon = Monitor(
            MetricsScraper("sglang", [srv.url + "/metrics"]), labels, POLICY, WINDOW_S, None, clock=clock
        )
        mon.tick()
        plain.serve_steps(100, 1.0)
        clock.advance(60)
        status = mon.tick()
    assert status.state is DriftState.NO_SPECULATION and "spec_accept_length is 0" in status.reason
    with EngineServer(metrics=FakeVLLMNoSpec().metrics) as srv:
        mon = Monitor(
            MetricsScraper("vllm", [srv.url + "/metrics"]), labels, POLICY, WINDOW_S, None, clock=clock
        )
        assert mon.tick().state is DriftState.NO_SPECULATION
    srv_url = srv.url  # closed now
    mon = Monitor(MetricsScraper("vllm", [srv_url + "/metrics"]), labels, POLICY, WINDOW_S, None, clock=clock)
    status = mon.tick()
    assert status.state is DriftState.MISSING and srv_url in status.reason
    assert mon.failures == 1


def test_replicas_are_summed_and_one_dead_replica_is_not_missing() -> None:
    a, b = FakeVLLM(), FakeVLLM()
    clock = FakeClock()
    with EngineServer(metrics=a.metrics) as sa, EngineServer(metrics=b.metrics) as sb:
        urls = [sa.url + "/metrics", sb.url + "/metrics", "http://127.0.0.1:9/metrics"]
        mon = Monitor(
            MetricsScraper("vllm", urls),
            MonitorLabels("m", "d", "vllm", "scrape"),
            POLICY,
            WINDOW_S,
            None,
            clock=clock,
        )
        mon.tick()
        a.serve_steps(300, 2)  # 3.0
        b.serve_steps(100, 0)  # 1.0
        clock.advance(60)
        status = mon.tick()
    assert status.observed == pytest.approx(1 + 600 / 400)
    assert status.state is DriftState.NO_BASELINE


def test_model_filter_names_what_it_saw() -> None:
    fake = FakeSGLang("interval", model="other")
    with EngineServer(metrics=fake.metrics) as srv:
        m = MetricsScraper("sglang", [srv.url + "/metrics"], model="qwen3-8b").collect()
    assert not m.reachable and "'qwen3-8b' not among ['other']" in m.detail


def test_learned_baseline_is_recorded_once_and_a_new_draft_resets_the_clock(tmp_path: Path) -> None:

    fake, clock = FakeVLLM(), FakeClock()
    path = tmp_path / "baseline.json"
    with EngineServer(metrics=fake.metrics) as srv:
        scraper = MetricsScraper("vllm", [srv.url + "/metrics"])
        labels = MonitorLabels("m", "run-5", "vllm", "scrape")
        mon = Monitor(scraper, labels, POLICY, WINDOW_S, None, learn_baseline_to=path, clock=clock)
        mon.tick()
        fake.serve_steps(50, 2)  # too few steps to learn from
        clock.advance(60)
        assert mon.tick().state is DriftState.INSUFFICIENT_DATA and not path.exists()
        fake.serve_steps(100, 2)
        clock.advance(60)
        assert mon.tick().state is DriftState.OK  # learned 3.0 from 150 steps, then compared with it
        learned = load_baseline(path)
        assert (learned.accept_length, learned.draft_version, learned.source) == (3.0, "run-5", "learned")
        for _ in range(6):  # the traffic degrades: 1.0 accepted per step -> 2.0 < 2.7
            fake.serve_steps(150, 1)
            clock.advance(60)
            status = mon.tick()
        assert status.state is DriftState.BELOW_BASELINE and load_baseline(path).accept_length == 3.0
        mon.set_baseline(Baseline(2.1, "run-6"))  # a new draft passed its gate
        assert mon.status is not None and mon.status.below_since is None
        fake.serve_steps(150, 1)
        clock.advance(60)
        assert mon.tick().state is DriftState.OK


SGLANG_TEXT = """# HELP sglang:spec_accept_length The average acceptance length of speculative decoding.
# TYPE sglang:spec_accept_length gauge
sglang:spec_accept_length{{dp_rank="0",engine_type="unified",model_name="qwen3-8b",pp_rank="0",tp_rank="0"}} {a}
sglang:spec_accept_length{{dp_rank="1",engine_type="unified",model_name="qwen3-8b",pp_rank="0",tp_rank="0"}} 0.0
# HELP sglang:generation_tokens_total Number of generation tokens processed.
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{{model_name="qwen3-8b"}} {g}
"""


def test_sglang_rank_that_never_decoded_is_not_averaged_in() -> None:
    pages = iter([SGLANG_TEXT.format(a=0.0, g=0), SGLANG_TEXT.format(a=2.5, g=1000)])
    scraper = MetricsScraper("sglang", ["http://sglang/metrics"])
    scraper.endpoints[0].fetch = lambda url: next(pages)
    assert scraper.collect().sample is None  # first scrape
    m = scraper.collect()
    assert m.sample is not None and 1 + m.sample.accepted_tokens / m.sample.verify_steps == pytest.approx(2.5)
