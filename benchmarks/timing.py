"""Timing and profiling shared by the benchmarks: repeats with their median, min and max, and a profile summary.

    rate = repeated_rate(step, items=16, device=dev, warmup=3, steps=20, repeats=3)   # {"median", "min", "max"}
    summary = profile_steps(step, device=dev, steps=5, out_dir=Path("trace"))        # top kernels, categories

`repeated_rate` synchronises the device only around each repeat, never inside the timed steps. `profile_steps` runs
torch.profiler over a few steps, writes a Chrome trace (`trace.json`) and returns the top kernels by self time on
the device (on the CPU: by self CPU time) and the time per category: matrix products, attention, memory-bound
element-wise and normalisation kernels, the optimizer, the EMA, copies, other; on a GPU also the host gaps (wall
time of the steps minus the time the device was busy).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CATEGORIES = (  # first match wins; names of ATen ops and of CUDA kernels, lower-cased
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_attn", "efficient_attention")),
    ("optimizer", ("adam",)),
    ("ema", ("lerp",)),
    ("matmul", ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "cutlass", "sm90_xmma",
                "nvjet", "ampere_", "sgemm", "aten::_scaled_mm")),
    ("copies", ("copy", "memcpy", "memset", "cat", "index", "scatter", "gather")),
    ("elementwise_and_norms", ("elementwise", "vectorized", "reduce", "norm", "softmax", "gelu", "silu", "add",
                               "mul", "div", "exp", "log", "where", "fill", "sum", "mean")),
)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repeated_rate(
    step: Callable[[int], object], *, items: int, device: torch.device, warmup: int, steps: int, repeats: int
) -> dict[str, Any]:
    """Items per second of `step(i)` (i counts every call): `warmup` calls, then `repeats` timed runs of `steps`."""
    calls = 0
    for _ in range(warmup):
        step(calls)
        calls += 1
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(calls)
            calls += 1
        sync(device)
        rates.append(items * steps / (time.perf_counter() - start))
    return {
        "median": round(statistics.median(rates), 3),
        "min": round(min(rates), 3),
        "max": round(max(rates), 3),
        "repeats": repeats,
        "steps_per_repeat": steps,
    }


def _category(name: str) -> str:
    lowered = name.lower()
    for category, needles in CATEGORIES:
        if any(n in lowered for n in needles):
            return category
    return "other"


def profile_steps(
    step: Callable[[int], object], *, device: torch.device, steps: int, out_dir: Path, top: int = 25
) -> dict[str, Any]:
    """Profiles `steps` calls of `step` (after the caller's warm-up) and summarises where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=False) as prof:
        for i in range(steps):
            step(i)
        sync(device)
    wall_us = (time.perf_counter() - start) * 1e6
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    on_gpu = device.type == "cuda"
    events = [e for e in prof.key_averages() if (e.self_device_time_total if on_gpu else e.self_cpu_time_total) > 0]
    self_us = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    if on_gpu:  # kernels only: the device's busy time, by kernel
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(self_us(e) for e in events)
    categories: dict[str, float] = {}
    for e in events:
        categories[_category(e.key)] = categories.get(_category(e.key), 0.0) + self_us(e)
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    summary = {
        "clock": "device kernels" if on_gpu else "cpu ops (self time)",
        "steps": steps,
        "wall_ms_per_step": round(wall_us / steps / 1e3, 3),
        "busy_ms_per_step": round(busy / steps / 1e3, 3),
        "categories_share": {k: round(v / busy, 4) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "top": [
            {
                "name": e.key[:120],
                "ms_per_step": round(self_us(e) / steps / 1e3, 4),
                "calls_per_step": e.count / steps,
                "category": _category(e.key),
            }
            for e in ranked
        ],  # fmt: skip
        "trace": str(out_dir / "trace.json"),
    }
    if on_gpu:
        summary["host_gap_share"] = round(max(0.0, 1 - busy / wall_us), 4)  # the device idle, waiting on the host
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
