"""Continuous batching: concurrent requests decode in shared steps and get what each would get alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from coreinfer import Engine, SamplingConfig, SparsityConfig
from coreinfer.scheduler import Cancelled, PrefixStore, QueueFull, QueueTimeout, Scheduler

from conftest import prompts, tiny_model
from test_cpu_kernels import _int4_model, needs_kernels

LEAN_ARCHS = ("llama", "qwen2", "gemma3_text")  # plain, with q/k/v biases, with sliding windows


def engine_for(arch: str) -> Engine:
    return Engine(tiny_model(arch), tokenizer=None, name=f"tiny-{arch}", weights="fp32", backend="lean")


def alone(engine: Engine, prompt, sparsity=None, sampling=SamplingConfig(max_new_tokens=12)):
    return engine.generate_ids([prompt], sparsity, sampling, ignore_eos=False)[0]


def staggered(scheduler: Scheduler, requests, delay_s: float = 0.0):
    """Submit ``requests`` (prompt, sparsity, sampling) one after another; wait for all."""
    subs = []
    for prompt, sparsity, sampling in requests:
        subs.append(scheduler.submit([prompt], sparsity, sampling))
        time.sleep(delay_s)
    return [sub.wait(60)[0] for sub in subs]


@pytest.mark.parametrize("arch", LEAN_ARCHS)
def test_concurrent_dense_greedy_equals_alone(arch):
    engine = engine_for(arch)
    ps = prompts((9, 5, 12, 3, 7))
    sampling = SamplingConfig(max_new_tokens=12)
    expected = [alone(engine, p, None, sampling).token_ids for p in ps]
    scheduler = Scheduler(engine, max_batch=8)
    try:
        got = staggered(scheduler, [(p, None, sampling) for p in ps])
    finally:
        scheduler.close()
    assert [r.token_ids for r in got] == expected
    assert all(r.backend == "lean" for r in got)
    assert scheduler.peak >= 3  # they did share steps


def join_midway(engine: Engine, running, late, sampling: SamplingConfig, late_sampling: SamplingConfig,
                after: int = 10) -> list[str]:
    """``running`` decodes; after its ``after``-th token ``late`` arrives; each must get its tokens alone.
    Returns what happened, in order: "running" and "late" for each token, and "late submitted"."""
    expected = alone(engine, running, None, sampling).token_ids
    expected_late = alone(engine, late, None, late_sampling).token_ids
    events: list[str] = []
    scheduler = Scheduler(engine, max_batch=4)
    try:
        first = scheduler.submit([running], None, sampling, on_token=lambda e: events.append("running"))
        while events.count("running") < after:  # the first request is decoding when the second arrives
            time.sleep(0.001)
        events.append("late submitted")
        second = scheduler.submit([late], None, late_sampling, on_token=lambda e: events.append("late"))
        assert second.wait(60)[0].token_ids == expected_late
        assert first.wait(60)[0].token_ids == expected
    finally:
        scheduler.close()
    return events


def test_joining_midway_changes_nobody_elses_tokens():
    running, late = prompts((4,))[0], prompts((30,), seed=5)[0]  # the latecomer's prompt is longer
    join_midway(engine_for("llama"), running, late, SamplingConfig(max_new_tokens=40), SamplingConfig(max_new_tokens=8))


@needs_kernels
def test_a_long_prompt_is_read_in_chunks_while_the_others_decode():
    """On the int4 lean prefill a latecomer's prompt of 8 chunks lets the running request take a step
    after each of the first 7; both get the tokens they get alone (prefilled in the same chunks)."""
    engine = Engine(_int4_model("llama"), tokenizer=None, name="tiny-int4", weights="int4", backend="lean")
    backend = engine.backend()
    assert backend.prefills
    backend.prefill_chunk = 8
    running, late = prompts((4,))[0], prompts((60,), seed=7)[0]
    events = join_midway(engine, running, late, SamplingConfig(max_new_tokens=40), SamplingConfig(max_new_tokens=6),
                         after=5)
    waiting = events[events.index("late submitted") + 1 : events.index("late")]
    assert waiting.count("running") >= 7  # a step between chunks (plus any before its admission)


@needs_kernels
def test_a_prompt_cancelled_while_it_is_read_leaves_and_the_others_go_on():
    engine = Engine(_int4_model("llama"), tokenizer=None, name="tiny-int4", weights="int4", backend="lean")
    engine.backend().prefill_chunk = 1  # 60 pauses: the cancel lands while the prompt is read, or before
    running, late = prompts((4,))[0], prompts((60,), seed=7)[0]
    sampling = SamplingConfig(max_new_tokens=30)
    expected = alone(engine, running, None, sampling).token_ids
    scheduler = Scheduler(engine, max_batch=4)
    try:
        first = scheduler.submit([running], None, sampling)
        second = scheduler.submit([late], None, SamplingConfig(max_new_tokens=6))
        second.cancel()
        with pytest.raises(Cancelled):
            second.wait(60)
        assert first.wait(60)[0].token_ids == expected
    finally:
        scheduler.close()


@needs_kernels
def test_a_prompt_sharing_a_kept_prefix_reads_only_the_rest_and_answers_as_alone():
    """Three prompts with one 20-token beginning (a system prompt), one after another: the second and
    third start from the first's kept keys and values, and each gets its tokens alone."""
    engine = Engine(_int4_model("llama"), tokenizer=None, name="tiny-int4", weights="int4", backend="lean")
    system = prompts((20,), seed=11)[0]
    asked = [system + tail for tail in prompts((6, 9, 4), seed=12)]
    sampling = SamplingConfig(max_new_tokens=10)
    expected = [alone(engine, p, None, sampling).token_ids for p in asked]
    scheduler = Scheduler(engine, max_batch=4)
    try:
        got = [scheduler.submit([p], None, sampling).wait(60)[0].token_ids for p in asked]
        store = scheduler.prefixes[id(engine.backend())]
    finally:
        scheduler.close()
    assert got == expected
    assert store.hits == 2 and len(store.entries) == 3


def test_the_prefix_store_keeps_the_longest_shared_beginning_within_its_bytes():
    from coreinfer.decode.lean import LayerCache, PromptCache

    def cache(tokens: int) -> PromptCache:
        return PromptCache([LayerCache(torch.arange(tokens * 2.0).view(1, 1, tokens, 2), torch.zeros(1, 1, tokens, 2))])

    store = PrefixStore(max_bytes=cache(40).nbytes(), min_tokens=4)
    a, b = list(range(30)), list(range(10)) + [99] * 5
    store.add(a, cache(30))
    assert store.longest([7] + a) is None  # nothing shared at the start
    assert store.longest(a[:3] + [5, 5]) is None  # below min_tokens
    kept = store.longest(a)  # the whole prompt is kept, but its last token must still be read
    assert kept.layers[0].keys.shape[2] == 29 and torch.equal(kept.layers[0].keys, cache(30).layers[0].keys[:, :, :29])
    store.add(b, cache(15))  # over the byte bound: the least recently used prompt goes
    assert list(store.entries) == [tuple(b)] and store.longest(a + [1]) is not None and store.hits == 2

def test_mixed_sparsity_and_sampling_each_as_alone():
    engine = engine_for("llama")
    ps = prompts((9, 5, 12, 6))
    greedy = SamplingConfig(max_new_tokens=10)
    sampled = SamplingConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    requests = [
        (ps[0], None, greedy),
        (ps[1], SparsityConfig(keep=0.5), greedy),  # sentence-level: its own compact weights
        (ps[2], None, sampled),
        (ps[3], SparsityConfig(keep=0.5), sampled),
    ]
    expected = [alone(engine, p, s, m) for p, s, m in requests]
    scheduler = Scheduler(engine, max_batch=8)
    try:
        got = staggered(scheduler, requests)
    finally:
        scheduler.close()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.ffn_density for r in got] == pytest.approx([r.ffn_density for r in expected])
    assert got[1].ffn_density < 1.0 and got[1].mode == "sentence"
    assert scheduler.peak >= 2


def test_token_level_under_concurrency_counts_each_request(monkeypatch, tmp_path):
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path))
    engine = engine_for("llama")
    ps = prompts((9, 5, 12))
    engine.token_profile(ps, [p[::-1] * 2 for p in ps], progress=False)
    sparsity = SparsityConfig(keep=0.6, mode="token")
    sampling = SamplingConfig(max_new_tokens=10)
    expected = [alone(engine, p, sparsity, sampling) for p in ps]
    scheduler = Scheduler(engine, max_batch=8)
    try:
        got = staggered(scheduler, [(p, sparsity, sampling) for p in ps])
    finally:
        scheduler.close()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.ffn_density for r in got] == pytest.approx([r.ffn_density for r in expected], rel=1e-6)
    assert all(r.mode == "token" and r.ffn_density < 1.0 for r in got)
    assert scheduler.peak >= 2


def test_requests_waiting_together_share_one_prefill_and_get_what_alone_gets(monkeypatch, tmp_path):
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path))
    engine = engine_for("llama")
    ps = prompts((9, 5, 12, 7))
    engine.token_profile(ps, [p[::-1] * 2 for p in ps], progress=False)
    greedy = SamplingConfig(max_new_tokens=8)
    requests = [(ps[0], None, greedy), (ps[1], None, greedy), (ps[2], SparsityConfig(keep=0.6, mode="token"), greedy),
                (ps[3], None, SamplingConfig(max_new_tokens=8, temperature=0.7, seed=1))]
    expected = [alone(engine, p, s, m) for p, s, m in requests]
    scheduler = Scheduler(engine, max_batch=8)
    try:
        with engine.lock:  # the scheduler takes the first and waits; the other three queue meanwhile
            first = scheduler.submit([requests[0][0]], None, greedy)
            first.admitted.wait(10)
            rest = [scheduler.submit([p], s, m) for p, s, m in requests[1:]]
        got = [first.wait(60)[0]] + [sub.wait(60)[0] for sub in rest]
    finally:
        scheduler.close()
    assert scheduler.prefills == 2  # the first alone, the three that waited together
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert got[2].mode == "token" and got[2].ffn_density == pytest.approx(expected[2].ffn_density, rel=1e-6)


def test_several_prompts_in_one_submission_equal_generate_ids():
    engine = engine_for("llama")
    ps = prompts((9, 5, 12))
    sampling = SamplingConfig(max_new_tokens=10)
    expected = engine.generate_ids(ps, None, sampling)
    scheduler = Scheduler(engine, max_batch=2)  # more sequences than max_batch: runs when alone
    try:
        got = scheduler.generate(ps, None, sampling, timeout=60)
    finally:
        scheduler.close()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]


def test_cancel_frees_the_slot():
    engine = engine_for("llama")
    scheduler = Scheduler(engine, max_batch=1)
    try:
        endless = scheduler.submit([prompts((5,))[0]], None, SamplingConfig(max_new_tokens=200))
        endless.admitted.wait(10)
        waiting = scheduler.submit([prompts((6,))[0]], None, SamplingConfig(max_new_tokens=3))
        time.sleep(0.05)
        assert not waiting.admitted.is_set()  # the only slot is taken
        endless.cancel()
        with pytest.raises(Cancelled):
            endless.wait(10)
        assert len(waiting.wait(30)[0].token_ids) == 3
        assert scheduler.active == 0
    finally:
        scheduler.close()


def test_a_callback_that_raises_cancels_only_its_request():
    engine = engine_for("llama")
    scheduler = Scheduler(engine, max_batch=4)

    def hang_up(event):
        raise RuntimeError("client went away")

    sampling = SamplingConfig(max_new_tokens=8)
    try:
        bad = scheduler.submit([prompts((5,))[0]], None, SamplingConfig(max_new_tokens=50), on_token=hang_up)
        good = scheduler.submit([prompts((7,))[0]], None, sampling)
        with pytest.raises(Cancelled):
            bad.wait(30)
        assert good.wait(30)[0].token_ids == alone(engine, prompts((7,))[0], None, sampling).token_ids
    finally:
        scheduler.close()


def test_queue_limit_and_timeout():
    engine = engine_for("llama")
    scheduler = Scheduler(engine, max_batch=1, max_queue=1, queue_timeout=0.05)
    try:
        busy = scheduler.submit([prompts((5,))[0]], None, SamplingConfig(max_new_tokens=250))
        busy.admitted.wait(10)
        queued = scheduler.submit([prompts((6,))[0]], None, SamplingConfig(max_new_tokens=3))
        with pytest.raises(QueueFull) as full:
            scheduler.submit([prompts((7,))[0]], None, SamplingConfig(max_new_tokens=3))
        assert full.value.retry_after >= 1
        with pytest.raises(QueueTimeout, match="waited"):
            queued.wait(30)
        busy.cancel()
    finally:
        scheduler.close()


def test_bad_submissions_are_refused_clearly():
    engine = engine_for("llama")
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(engine, max_batch=0)
    scheduler = Scheduler(engine)
    try:
        with pytest.raises(ValueError, match="at least one token"):
            scheduler.submit([[]])
        too_long = scheduler.submit([[1] * 10], None, SamplingConfig(max_new_tokens=1000))
        with pytest.raises(ValueError, match="decodes at most"):
            too_long.wait(30)
        assert scheduler.generate([[3, 4]], None, SamplingConfig(max_new_tokens=2), timeout=30)[0].new_tokens == 2
    finally:
        scheduler.close()


# The server's side: limits answered over HTTP


def tiny_server(**limits):
    from conftest import tiny_tokenizer

    from coreinfer.server import ServerSettings, create_app, serve_in_thread

    engine = Engine(tiny_model("llama"), tokenizer=tiny_tokenizer(), name="tiny", weights="fp32", backend="lean")
    settings = ServerSettings(keep=1.0, max_tokens=4, max_tokens_limit=400, **limits)
    return serve_in_thread(create_app(engine, settings))


def long_stream(http, url):
    body = {"prompt": "w5 w6 w7", "max_tokens": 240, "stream": True, "dense": True}  # no end-of-text before 240
    return http.stream("POST", f"{url}/v1/completions", json=body)


def test_server_answers_429_with_retry_after_past_the_queue():
    import httpx

    with tiny_server(max_batch=1, max_queue=0) as url, httpx.Client(timeout=60) as http:
        with long_stream(http, url) as busy:
            lines = busy.iter_lines()  # (held: a dropped iterator closes the stream)
            next(lines)  # the only slot is decoding
            refused = http.post(f"{url}/v1/completions", json={"prompt": "w9 w10", "dense": True})
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        # The stream was left early: its slot is free again and the next request is answered.
        for _ in range(100):  # the server notices the hang-up within a step or two
            again = http.post(f"{url}/v1/completions", json={"prompt": "w9 w10", "dense": True})
            if again.status_code != 429:
                break
            time.sleep(0.05)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] >= 1


def test_server_answers_503_to_a_request_that_waited_too_long():
    import httpx

    with tiny_server(max_batch=1, max_queue=4, queue_timeout=0.05) as url, httpx.Client(timeout=60) as http:
        with long_stream(http, url) as busy:
            lines = busy.iter_lines()
            next(lines)
            late = http.post(f"{url}/v1/completions", json={"prompt": "w9 w10", "dense": True, "stream": True})
        assert late.status_code == 503
        assert "waited" in late.json()["error"]["message"]


def test_server_settings_refuse_bad_limits():
    from coreinfer.server import ServerSettings

    with pytest.raises(ValueError, match="max_batch"):
        ServerSettings(max_batch=0)
    with pytest.raises(ValueError, match="queue_timeout"):
        ServerSettings(queue_timeout=0)
