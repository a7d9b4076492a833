"""``coreinfer bench-serve``: the server under load, as its users see it.

The server runs in this process on a loopback port; ``openai`` clients in threads send
streaming chat requests, 1, 2, 4 and 8 at a time. Per wave: total completion tokens per
second of wall time, time to first token, each request's own decode tokens per second
(p50, p95) and the process's RSS. The soak then sends a bounded number of mixed requests
(streaming or not, sparse or dense, some cancelled mid-stream) and counts how each ended:
answered, refused with a status, cancelled by its client, or still hanging at the deadline.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import psutil

from .server import ServerSettings, create_app, serve_in_thread

PROMPTS = (
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue to a ten-year-old.",
    "Give three tips for writing clear emails.",
    "What should I pack for a weekend hiking trip?",
    "Describe how a bicycle works.",
    "Why do cats purr?",
    "Suggest a name for a coffee shop and say why.",
    "How do vaccines train the immune system?",
)


@dataclass
class RequestTiming:
    first_token_s: float  # from sending the request to its first content
    total_s: float
    tokens: int  # completion tokens (the usage the server reports)

    @property
    def decode_tok_s(self) -> float:
        """This request's own pace after its first token."""
        span = self.total_s - self.first_token_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


@dataclass
class Wave:
    clients: int
    requests: int
    wall_s: float
    total_tok_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    request_tok_s_p50: float
    request_tok_s_p95: float
    rss_peak_mib: float
    timings: list = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; 0 for no values."""
    return float(np.percentile(values, 100 * q)) if len(values) else 0.0


class RssSampler:
    """Samples this process's resident memory every ``every_s`` seconds while running."""

    def __init__(self, every_s: float = 0.05):
        self.every_s, self.peak, self.process = every_s, 0, psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def stream_chat(client, model: str, prompt: str, max_tokens: int, extra: Optional[dict] = None,
                cancel_after: Optional[int] = None) -> RequestTiming:
    """One streaming chat request; ``cancel_after`` content chunks, the client hangs up."""
    start = time.perf_counter()
    first, tokens, chunks = None, 0, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body=extra or {},
    )
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
                if cancel_after is not None and chunks >= cancel_after:
                    break
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    finally:
        stream.close()
    total = time.perf_counter() - start
    return RequestTiming(first if first is not None else total, total, tokens or chunks)


def run_wave(client, model: str, clients: int, requests_per_client: int, max_tokens: int,
             extra: Optional[dict] = None, timeout_s: float = 600.0) -> Wave:
    """``clients`` threads, each sending ``requests_per_client`` streaming requests one after another."""
    def client_loop(k: int) -> list[RequestTiming]:
        return [stream_chat(client, model, PROMPTS[(k + i * clients) % len(PROMPTS)], max_tokens, extra)
                for i in range(requests_per_client)]

    with RssSampler() as rss, ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        futures = [pool.submit(client_loop, k) for k in range(clients)]
        done, pending = wait(futures, timeout=timeout_s)
        wall = time.perf_counter() - start
    if pending:
        raise RuntimeError(f"{len(pending)} of {clients} clients had not finished after {timeout_s:g} s")
    timings = [t for f in futures for t in f.result()]
    ttft = [t.first_token_s for t in timings]
    pace = [t.decode_tok_s for t in timings]
    return Wave(clients, len(timings), round(wall, 3), round(sum(t.tokens for t in timings) / wall, 2),
                round(percentile(ttft, 0.5), 4), round(percentile(ttft, 0.95), 4),
                round(percentile(pace, 0.5), 2), round(percentile(pace, 0.95), 2),
                round(rss.peak / 2**20, 1), [asdict(t) for t in timings])


def soak(url: str, model: str, requests: int, concurrency: int, max_tokens: int, seed: int = 0,
         cancel_share: float = 0.1, deadline_s: float = 600.0) -> dict:
    """``requests`` mixed requests, ``concurrency`` at a time; how each ended, and RSS."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=deadline_s)
    rng = random.Random(seed)
    plans = []
    for i in range(requests):
        plans.append({
            "prompt": PROMPTS[i % len(PROMPTS)],
            "stream": rng.random() < 0.7,
            "extra": {"dense": True} if rng.random() < 0.3 else {},
            "cancel": rng.random() < cancel_share,
            "max_tokens": rng.choice([8, max_tokens // 2, max_tokens]),
        })

    def one(plan) -> str:
        try:
            if plan["cancel"]:
                stream_chat(client, model, plan["prompt"], plan["max_tokens"], plan["extra"], cancel_after=2)
                return "cancelled"
            if plan["stream"]:
                stream_chat(client, model, plan["prompt"], plan["max_tokens"], plan["extra"])
            else:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": plan["prompt"]}],
                                               max_tokens=plan["max_tokens"], extra_body=plan["extra"])
            return "answered"
        except openai.APIStatusError as err:
            return f"refused {err.status_code}"
        except openai.APIConnectionError:
            return "connection error"

    outcomes: dict[str, int] = {}
    first_wave_rss = None
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, plan) for plan in plans]
        for index, future in enumerate(futures):
            remaining = deadline_s - (time.perf_counter() - start)
            try:
                outcome = future.result(timeout=max(remaining, 0.001))
            except TimeoutError:
                outcome = "hanging"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if index + 1 == concurrency:
                first_wave_rss = rss_mib()
    time.sleep(0.5)  # cancelled streams leave at their next step
    final_rss = rss_mib()
    return {"requests": requests, "concurrency": concurrency, "outcomes": outcomes,
            "wall_s": round(time.perf_counter() - start, 1), "rss_first_wave_mib": round(first_wave_rss or 0, 1),
            "rss_after_mib": round(final_rss, 1),
            "rss_growth": round(final_rss / first_wave_rss - 1, 4) if first_wave_rss else None}


def run(engine, out: Path, clients: Sequence[int] = (1, 2, 4, 8), requests_per_client: int = 2,
        max_tokens: int = 64, soak_requests: int = 200, soak_concurrency: int = 8,
        settings: Optional[ServerSettings] = None, extra: Optional[dict] = None,
        echo: Callable[[str], None] = print) -> dict:
    """The waves and the soak against ``engine``; writes ``serve.json`` and ``serve.md`` into ``out``."""
    import openai

    settings = settings or ServerSettings(max_tokens=max_tokens, max_batch=max(clients, default=8))
    report: dict = {"model": engine.name, "max_tokens": max_tokens, "max_batch": settings.max_batch, "waves": []}
    with serve_in_thread(create_app(engine, settings)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        stream_chat(client, engine.name, PROMPTS[0], 8, extra)  # warm-up: calibrations, gather layouts
        for n in clients:
            wave = run_wave(client, engine.name, n, requests_per_client, max_tokens, extra)
            echo(f"{n} clients: {wave.total_tok_s} tok/s in all, first token p50 {wave.ttft_p50_s} s "
                 f"p95 {wave.ttft_p95_s} s, per request p50 {wave.request_tok_s_p50} tok/s")
            report["waves"].append(asdict(wave))
        if soak_requests:
            report["soak"] = soak(url, engine.name, soak_requests, soak_concurrency, max_tokens)
            echo(f"soak: {report['soak']}")
    base = next((w for w in report["waves"] if w["clients"] == 1), None)
    for wave in report["waves"]:
        wave["throughput_vs_1"] = round(wave["total_tok_s"] / base["total_tok_s"], 3) if base else None
        wave["ttft_p95_vs_1"] = round(wave["ttft_p95_s"] / base["ttft_p95_s"], 3) if base else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "serve.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"Model {report['model']}, {report['max_tokens']} tokens per streaming chat request, "
             f"--max-batch {report['max_batch']}.", "",
             "| clients | requests | total tok/s | × 1 client | first token p50 / p95 (s) | p95 × 1 client "
             "| per-request tok/s p50 / p95 | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for w in report["waves"]:
        lines.append(f"| {w['clients']} | {w['requests']} | {w['total_tok_s']} | {w['throughput_vs_1']} | "
                     f"{w['ttft_p50_s']} / {w['ttft_p95_s']} | {w['ttft_p95_vs_1']} | "
                     f"{w['request_tok_s_p50']} / {w['request_tok_s_p95']} | {w['rss_peak_mib']} |")
    if "soak" in report:
        s = report["soak"]
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(s["outcomes"].items()))
        lines += ["", f"Soak: {s['requests']} mixed requests, {s['concurrency']} at a time, {s['wall_s']} s: "
                      f"{outcomes}. RSS {s['rss_first_wave_mib']} MiB after the first wave, "
                      f"{s['rss_after_mib']} MiB after the soak ({s['rss_growth']:+.1%})."]
    return "\n".join(lines) + "\n"
