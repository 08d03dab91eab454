"""Backbone throughput: inference and forward-backward images/s at 224 px, one JSON record per preset.

    python benchmarks/backbone.py --arch vit_large vit_giant2 --device cuda            # batch 128, bf16 autocast
    python benchmarks/backbone.py --arch vit_test vit_tiny vit_small --device cpu --batch 8 --iters 3

Prints one JSON list: arch, device, dtype, batch, infer_img_s, train_img_s, peak_mem_gib and context (card, torch
version, compile, attention, depth). On a GPU: bf16 autocast, `torch.compile` of each transformer block by default
(`--no-compile` to turn it off), fused SDPA attention, no host synchronisation inside the timed loops.
`--attention naive` swaps in the release's non-xFormers attention math (q k^T, softmax, v); with `--no-compile` it
is a same-card baseline for the official code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package

from components.model import PRESETS, build_backbone  # noqa: E402
from components.model.vit import Attention  # noqa: E402


def naive_attention(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """The release's `Attention.forward` without xFormers, for a baseline."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (C // self.num_heads) ** -0.5, qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):  # includes compilation and autotuning
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)  # the only synchronisation: after the timed loop
    return (time.perf_counter() - start) / iters


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux; process-wide peak


def bench_arch(arch: str, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """Measures one preset; a phase that runs out of memory is reported as null with the reason."""
    use_bf16 = device.type == "cuda"
    compile_model = args.compile if args.compile is not None else device.type == "cuda"
    overrides = {"depth": args.depth} if args.depth else {}
    model = build_backbone(arch, drop_path_rate=args.drop_path, **overrides).to(device)
    if compile_model:  # regional compilation, as the training engine: one compiled block serves every block
        for block in model.blocks:
            block.compile()
    runner = model
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    record: dict[str, object] = {
        "arch": arch,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "bf16-autocast" if use_bf16 else "fp32",
        "batch": args.batch,
        "img_size": args.img_size,
        "depth": model.n_blocks,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "compile": compile_model,
        "attention": args.attention,
        "torch": torch.__version__,
    }

    def infer() -> object:
        with torch.inference_mode(), autocast():
            return runner(images)

    def train_step() -> None:
        with autocast():
            out = runner(images, is_training=True)  # the forward_features dict
            loss = out["x_norm_clstoken"].float().mean() + out["x_norm_patchtokens"].float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    peaks = []
    for phase, fn, mode in (("infer", infer, False), ("train", train_step, True)):
        model.train(mode)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds = _seconds_per_call(fn, device, args.warmup, args.iters)
            record[f"{phase}_img_s"] = round(args.batch / seconds, 2)
        except torch.OutOfMemoryError:
            record[f"{phase}_img_s"], record[f"{phase}_error"] = None, "out of memory"
            model.zero_grad(set_to_none=True)
        peaks.append(_peak_mem_gib(device))
        record[f"{phase}_peak_mem_gib"] = round(peaks[-1], 3)
    record["peak_mem_gib"] = round(max(peaks), 3)
    record["peak_mem_kind"] = "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"
    return record


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", required=True, choices=list(PRESETS), help="presets to measure")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128, help="images per step (128 as the reference numbers)")
    parser.add_argument("--img-size", type=int, default=224, help="square input side in pixels")
    parser.add_argument("--depth", type=int, default=None, help="override the preset's depth (quick CPU runs)")
    parser.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate in the training step")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 on cuda, 1 on cpu)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 20 on cuda, 3 on cpu)")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on cuda)"
    )
    parser.add_argument("--attention", choices=["sdpa", "naive"], default="sdpa", help="naive: the release's math")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    args.warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    args.iters = args.iters if args.iters is not None else (20 if device.type == "cuda" else 3)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.attention == "naive":
        Attention.forward = naive_attention  # type: ignore[method-assign]
    records = [bench_arch(arch, args, device) for arch in args.arch]
    print(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
