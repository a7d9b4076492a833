"""Peak memory and decode speed: dense vs memory-limited mode, each run in a fresh process.

Peak resident memory is a process-lifetime high-water mark, so every
configuration runs in its own subprocess (``python -m coreinfer.offload_bench
SPEC``) and prints one JSON line. A ``baseline`` run imports everything and
builds the model skeleton without weights, so the Python/torch/transformers
share of the peak can be subtracted.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

PROMPT = "Write a short story about a robot who learns to paint."
MB = 1024 * 1024
MALLOC_MMAP_THRESHOLD = 1 << 20


@dataclass(frozen=True)
class RunSpec:
    """One configuration to measure. ``mode``: baseline, dense, sparse or memory-limited."""

    mode: str
    keep: Optional[float] = None
    model: Optional[str] = None
    device: Optional[str] = None
    prompt: str = PROMPT
    max_new_tokens: int = 64
    repeats: int = 3
    dtype: str = "float32"  # what the model is loaded in (loading.DTYPE_CHOICES)


def peak_rss_mb() -> float:
    """This process's peak resident set since it was started.

    Linux's ``VmHWM`` belongs to the address space, which ``exec`` replaces;
    ``ru_maxrss`` survives ``exec``, so a child started from a large parent
    would report at least the parent's peak. ``ru_maxrss`` is the fallback
    elsewhere (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> dict[str, float]:
    """Resident memory now, split into anonymous and file-backed pages where /proc tells."""
    fields = {"VmRSS": "rss_mb", "RssAnon": "rss_anon_mb", "RssFile": "rss_file_mb"}
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in fields:
                out[fields[key]] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def _baseline(spec: RunSpec) -> dict:
    """Everything a run imports and builds except the weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .loading import cached_model_dir, load_dtype, resolve_model_path
    from .offload import resolve_device

    path = resolve_model_path(spec.model)
    hf_dir = cached_model_dir(path) if path.is_file() else path
    AutoTokenizer.from_pretrained(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)
    with init_empty_weights():
        AutoModelForCausalLM.from_config(config, dtype=load_dtype(spec.dtype, config, resolve_device(spec.device)))
    return {}


def _generate(spec: RunSpec) -> dict:
    import torch

    from . import SamplingConfig, SparsityConfig, load

    engine = load(spec.model, device=spec.device, dtype=spec.dtype, memory_limit=spec.mode == "memory-limited")
    after_load = {"peak_rss_after_load_mb": round(peak_rss_mb(), 1)}
    sparsity = None if spec.mode == "dense" else SparsityConfig(keep=spec.keep)
    sampling = SamplingConfig(max_new_tokens=spec.max_new_tokens)
    results = [engine.generate(spec.prompt, sparsity, sampling) for _ in range(spec.repeats)]
    row = {
        "decode_tok_s": round(statistics.median(r.decode_tok_s for r in results), 2),
        "prefill_s": round(statistics.median(r.prefill_s for r in results), 4),
        "select_s": round(statistics.median(r.select_s for r in results), 4),
        "new_tokens": results[0].new_tokens,
        "ffn_density": round(results[0].ffn_density, 4),
        "device": str(engine.device),
        "token_ids_head": results[0].token_ids[:16],
        **after_load,
        **current_rss_mb(),  # while the engine is alive
    }
    if engine.device.type == "cuda":
        row["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(engine.device) / MB, 1)
    return row


def measure(spec: RunSpec) -> dict:
    """Run one configuration in this process and return its measurements."""
    row = asdict(spec)
    row.pop("prompt")
    row.update(_baseline(spec) if spec.mode == "baseline" else _generate(spec))
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if spec.mode == "baseline":
        row.update(current_rss_mb())
    return row


def measure_in_subprocess(spec: RunSpec, timeout: float = 900) -> dict:
    """``measure`` in a fresh interpreter, so its peak is its own."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_src_dir(), os.environ.get("PYTHONPATH")])))
    # A fixed glibc mmap threshold makes freed large blocks (a finished request's compact
    # weights) go back to the OS instead of lingering in the heap and inflating the next
    # request's peak. Every mode runs with it, so the comparison stays fair.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MALLOC_MMAP_THRESHOLD))
    done = subprocess.run(
        [sys.executable, "-m", "coreinfer.offload_bench", json.dumps(asdict(spec))],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec.mode} keep={spec.keep} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _src_dir() -> str:
    # The child imports the same coreinfer as this process (a worktree, not another install).
    return str(Path(__file__).resolve().parent.parent)


def default_specs(
    keeps: Sequence[float],
    model: Optional[str],
    device: Optional[str],
    max_new_tokens: int,
    repeats: int,
    dtype: str = "float32",
) -> list[RunSpec]:
    common = dict(model=model, device=device, max_new_tokens=max_new_tokens, repeats=repeats, dtype=dtype)
    specs = [RunSpec("baseline", model=model, device=device, dtype=dtype), RunSpec("dense", **common)]
    specs.append(RunSpec("sparse", keep=0.4, **common))
    specs += [RunSpec("memory-limited", keep=k, **common) for k in keeps]
    return specs


def add_ratios(rows: list[dict]) -> list[dict]:
    """Peak RSS and decode speed relative to dense; ``model_mb`` is peak minus the baseline run's peak."""
    baseline = next((r["peak_rss_mb"] for r in rows if r["mode"] == "baseline"), 0.0)
    dense = next(r for r in rows if r["mode"] == "dense")
    dense_model = dense["peak_rss_mb"] - baseline
    for row in rows:
        row["model_mb"] = round(row["peak_rss_mb"] - baseline, 1)
        if row["mode"] == "baseline":
            continue
        row["rss_vs_dense"] = round(row["peak_rss_mb"] / dense["peak_rss_mb"], 3)
        row["model_mb_vs_dense"] = round(row["model_mb"] / dense_model, 3) if dense_model > 0 else None
        row["speed_vs_dense"] = round(row["decode_tok_s"] / dense["decode_tok_s"], 3) if dense["decode_tok_s"] else None
        if "gpu_peak_mb" in row and "gpu_peak_mb" in dense:
            row["gpu_vs_dense"] = round(row["gpu_peak_mb"] / dense["gpu_peak_mb"], 3)
    return rows


def markdown_table(rows: list[dict]) -> str:
    gpu = any("gpu_peak_mb" in r for r in rows)
    head = ["mode", "keep", "peak RSS MB", "× dense", "above baseline MB", "× dense", "decode tok/s", "× dense", "ffn_density"]
    if gpu:
        head += ["GPU peak MB", "× dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["mode"], _fmt(r.get("keep")), _fmt(r["peak_rss_mb"]), _fmt(r.get("rss_vs_dense")),
            _fmt(r["model_mb"]), _fmt(r.get("model_mb_vs_dense")), _fmt(r.get("decode_tok_s")),
            _fmt(r.get("speed_vs_dense")), _fmt(r.get("ffn_density")),
        ]
        if gpu:
            cells += [_fmt(r.get("gpu_peak_mb")), _fmt(r.get("gpu_vs_dense"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "–" if value is None else str(value)


def run_bench(specs: Sequence[RunSpec], out_dir: Path, echo=print) -> list[dict]:
    """Measure every spec in its own subprocess; write ``memory.json`` and ``memory.md`` to ``out_dir``."""
    rows = []
    for spec in specs:
        echo(f"measuring {spec.mode}" + (f" keep={spec.keep}" if spec.keep is not None else ""))
        rows.append(measure_in_subprocess(spec))
    rows = add_ratios(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "memory.md").write_text(markdown_table(rows))
    return rows


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(json.dumps(measure(RunSpec(**json.loads(sys.argv[1])))))
