"""Backbone throughput: inference and forward-backward images/s at 224 px, one JSON record per preset, with a
baseline measured in the same run.

    python benchmarks/backbone.py --arch vit_large vit_giant2 --device cuda --baseline timm   # batch 128, bf16
    python benchmarks/backbone.py --arch vit_small --device cpu --batch 8 --iters 3 --repeats 2 --baseline timm

Prints one JSON list: arch, device, dtype, batch, infer_img_s and train_img_s (median of `--repeats` runs of `--iters`
calls after `--warmup`, with min and max), peak_mem_gib and context (card, torch version, compile, attention,
depth). On a GPU: bf16 autocast, `torch.compile` of each transformer block by default (`--no-compile` to turn it
off), fused SDPA attention, no host synchronisation inside the timed loops. `--baseline timm` measures timm's DINOv2
ViT of the same size (random weights, the same compilation) in the same process and adds `baseline` and `ratio`
(ours over timm; timm measured within 1% of the research code on an H200). `--attention naive` swaps in the
release's non-xFormers attention math (q k^T, softmax, v).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import repeated_rate  # noqa: E402

from components.model import PRESETS, build_backbone  # noqa: E402
from components.model.vit import Attention  # noqa: E402

TIMM_MODELS = {"vit_small": "vit_small_patch14_dinov2", "vit_base": "vit_base_patch14_dinov2",
               "vit_large": "vit_large_patch14_dinov2", "vit_giant2": "vit_giant_patch14_dinov2"}  # fmt: skip


def naive_attention(
    self: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """The release's `Attention.forward` without xFormers, for a baseline (DINOv2: no RoPE)."""
    if rope is not None:
        raise ValueError("the naive baseline is DINOv2's attention, without RoPE")
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (C // self.num_heads) ** -0.5, qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux; process-wide peak


def build_model(arch: str, args: argparse.Namespace, device: torch.device, kind: str) -> torch.nn.Module:
    """Ours (`kind` "ours") or timm's model of the same size, on the device, blocks compiled when asked."""
    overrides = {"depth": args.depth} if args.depth else {}
    if kind == "timm":
        import timm

        name = TIMM_MODELS[arch]  # at the benchmark's image size, as timm users create it (no per-call resize)
        model = timm.create_model(
            name, pretrained=False, img_size=args.img_size, drop_path_rate=args.drop_path, **overrides
        )
    else:
        model = build_backbone(arch, drop_path_rate=args.drop_path, **overrides)
    model = model.to(device)
    if args.compile:  # regional compilation, as the training engine: one compiled block serves every block
        for block in model.blocks:
            block.compile()
    return model


def measure(model: torch.nn.Module, args: argparse.Namespace, device: torch.device, kind: str) -> dict[str, object]:
    """Inference and training images/s of one model; a phase that runs out of memory is null with the reason."""
    use_bf16 = device.type == "cuda"
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def features(training: bool) -> torch.Tensor:
        if kind == "timm":
            return model.forward_features(images).float().mean()
        out = model(images, is_training=True) if training else {"x_norm_clstoken": model(images)}
        return sum(v.float().mean() for k, v in out.items() if k in ("x_norm_clstoken", "x_norm_patchtokens"))

    def infer(_: int) -> object:
        with torch.inference_mode(), autocast():
            return features(False)

    def train_step(_: int) -> None:
        with autocast():
            loss = features(True)
        loss.backward()
        model.zero_grad(set_to_none=True)

    record: dict[str, object] = {}
    peaks = []
    for phase, fn, mode in (("infer", infer, False), ("train", train_step, True)):
        model.train(mode)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            rate = repeated_rate(
                fn, items=args.batch, device=device, warmup=args.warmup, steps=args.iters, repeats=args.repeats
            )
            record[f"{phase}_img_s"] = rate["median"]
            record[f"{phase}_img_s_range"] = [rate["min"], rate["max"]]
        except torch.OutOfMemoryError:
            record[f"{phase}_img_s"], record[f"{phase}_error"] = None, "out of memory"
            model.zero_grad(set_to_none=True)
        peaks.append(_peak_mem_gib(device))
        record[f"{phase}_peak_mem_gib"] = round(peaks[-1], 3)
    record["peak_mem_gib"] = round(max(peaks), 3)
    return record


def bench_arch(arch: str, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """Measures one preset, and its timm twin with `--baseline timm`."""
    model = build_model(arch, args, device, "ours")
    record: dict[str, object] = {
        "arch": arch,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "bf16-autocast" if device.type == "cuda" else "fp32",
        "batch": args.batch,
        "img_size": args.img_size,
        "depth": model.n_blocks,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "compile": args.compile,
        "attention": args.attention,
        "torch": torch.__version__,
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        **measure(model, args, device, "ours"),
    }
    del model
    if args.baseline == "timm":
        import timm

        baseline = build_model(arch, args, device, "timm")
        record["baseline"] = {
            "model": TIMM_MODELS[arch],
            "timm": timm.__version__,
            **measure(baseline, args, device, "timm"),
        }
        for phase in ("infer", "train"):
            ours, theirs = record[f"{phase}_img_s"], record["baseline"][f"{phase}_img_s"]
            record[f"{phase}_ratio"] = round(ours / theirs, 3) if ours and theirs else None
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
    parser.add_argument("--iters", type=int, default=None, help="timed calls per repeat (default 20 on cuda, 3 on cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported, with min and max")
    parser.add_argument("--baseline", choices=["none", "timm"], default="none", help="timm's model, same process")
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
    args.compile = args.compile if args.compile is not None else device.type == "cuda"
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
