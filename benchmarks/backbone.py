"""Backbone throughput: inference and forward-backward images/s at 224 px, one JSON record per preset, with a
baseline measured in the same run.

    python benchmarks/backbone.py --arch vit_large vit_giant2 --device cuda --baseline timm   # batch 128, bf16
    python benchmarks/backbone.py --arch dinov3_vitl16 --device cuda --baseline timm          # timm's, same weights
    python benchmarks/backbone.py --arch vit_small --device cpu --batch 8 --iters 3 --repeats 2 --baseline timm

Prints one JSON list: arch, device, dtype, batch, infer_img_s and train_img_s (median of `--repeats` runs of `--iters`
calls after `--warmup`, with min and max), peak_mem_gib and context (card, torch version, compile, attention,
depth). On a GPU: bf16 autocast, `torch.compile` of each transformer block by default (`--no-compile` to turn it
off), fused SDPA attention, no host synchronisation inside the timed loops. `--baseline timm` measures timm's DINOv2
ViT of the same size (random weights, the same compilation) in the same process and adds `baseline` and `ratio`
(ours over timm; timm measured within 1% of the research code on an H200). `--attention naive` swaps in the
release's non-xFormers attention math (q k^T, softmax, v).

For a DINOv3 ViT (`--arch dinov3_vitl16`, ...) the timm baseline is timm's DINOv3 model of the same architecture
(`timm_twins.TIMM_DINOV3`: `vit_large_patch16_dinov3_qkvb` for ViT-L/16) holding the same weights: ours, drawn at a
trained model's scale (`timm_twins.seeded_weights_`), written in the release's layout (`official_state_dict`),
converted by timm's own checkpoint filter and loaded strictly. Before any timing, `parity` gives the largest
|ours - timm| of the CLS, storage and patch features of `--parity-batch` images: in float32 (TF32 off; `ok` when
within `tolerance`), under bf16 autocast on a GPU, and with our RoPE periods rounded to bf16 as the files trained
with bf16 RoPE hold them (timm recomputes its own); `baseline.dropped_keys` lists what timm's filter leaves out.
`infer_mem_ratio` and `train_mem_ratio` (GPU only) are ours over timm's peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm_twins  # noqa: E402
from timing import repeated_rate  # noqa: E402

from components.model import PRESETS, build_backbone, family_of  # noqa: E402
from components.model.vit import Attention  # noqa: E402


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


def is_dinov3(arch: str) -> bool:
    return family_of(arch).name == "dinov3_vit"


def build_model(arch: str, args: argparse.Namespace, device: torch.device, kind: str) -> torch.nn.Module:
    """Ours (`kind` "ours") or timm's DINOv2 model of the same size (random weights), on the device, eager."""
    overrides = {"depth": args.depth} if args.depth else {}
    if kind == "timm":  # at the benchmark's image size, as timm users create it (no per-call resize)
        model = timm_twins.dinov2_twin(arch, img_size=args.img_size, drop_path_rate=args.drop_path, **overrides)
    else:
        model = build_backbone(arch, drop_path_rate=args.drop_path, **overrides)
        if is_dinov3(arch):  # the same weights go to timm's twin: every term of the blocks non-trivial
            timm_twins.seeded_weights_(model, seed=0)
    return model.to(device)


def compile_blocks(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """Regional compilation when asked, as the training engine: one compiled block serves every block."""
    if args.compile:
        for block in model.blocks:
            block.compile()
    return model


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """float32 matrix products and convolutions without TF32, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def dinov3_twin_with_parity(
    ours: torch.nn.Module, arch: str, args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, dict[str, object], dict[str, object]]:
    """timm's twin of our DINOv3 model holding its weights, the parity of their features, and what timm dropped."""
    import timm

    twin = timm_twins.dinov3_twin(arch, ours.cfg, img_size=args.img_size)
    dropped = timm_twins.load_into_twin(ours, twin)
    twin = twin.to(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.parity_batch, 3, args.img_size, args.img_size, generator=generator).to(device)
    with exact_fp32():
        fp32 = timm_twins.feature_parity(ours, twin, images)
        release = timm_twins.feature_parity(ours, twin, images, release_periods=True)
    bf16 = (
        timm_twins.feature_parity(ours, twin, images, autocast_dtype=torch.bfloat16) if device.type == "cuda" else None
    )
    parity = {
        "images": [args.parity_batch, 3, args.img_size, args.img_size],
        "fp32": fp32,
        "tolerance": args.parity_tol,
        "ok": fp32["max_abs"] <= args.parity_tol,
        "bf16_autocast": bf16,
        "fp32_release_bf16_periods": release,
    }
    baseline = {
        "model": timm_twins.timm_name(arch, ours.cfg),
        "timm": timm.__version__,
        "weights": "ours: official_state_dict -> timm.models.eva.checkpoint_filter_fn -> load_state_dict(strict=True)",
        "dropped_keys": dropped,
    }
    return twin, parity, baseline


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
    """Measures one preset, and its timm twin with `--baseline timm` (for DINOv3: with our weights, parity first)."""
    model = build_model(arch, args, device, "ours")
    twin = None
    if args.baseline == "timm" and is_dinov3(arch):
        twin, parity, twin_record = dinov3_twin_with_parity(model, arch, args, device)
        twin = twin.cpu()  # off the device while ours is measured: each peak is one model's
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
    }
    if twin is not None:
        record["parity"] = parity
    record.update(measure(compile_blocks(model, args), args, device, "ours"))
    del model
    if args.baseline == "timm":
        import timm

        if twin is not None:
            baseline, info = compile_blocks(twin.to(device), args), twin_record
        else:
            baseline = compile_blocks(build_model(arch, args, device, "timm"), args)
            info = {"model": timm_twins.TIMM_DINOV2[arch], "timm": timm.__version__}
        record["baseline"] = {**info, **measure(baseline, args, device, "timm")}
        for phase in ("infer", "train"):
            ours, theirs = record[f"{phase}_img_s"], record["baseline"][f"{phase}_img_s"]
            record[f"{phase}_ratio"] = round(ours / theirs, 3) if ours and theirs else None
            if device.type == "cuda":
                ours, theirs = record[f"{phase}_peak_mem_gib"], record["baseline"][f"{phase}_peak_mem_gib"]
                record[f"{phase}_mem_ratio"] = round(ours / theirs, 3) if theirs else None
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
    parser.add_argument("--parity-batch", type=int, default=4, help="DINOv3 with --baseline timm: images compared")
    parser.add_argument("--parity-tol", type=float, default=timm_twins.PARITY_TOLERANCE, help="fp32 max |ours - timm|")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    twins = {**timm_twins.TIMM_DINOV2, **timm_twins.TIMM_DINOV3}
    no_twin = [a for a in args.arch if a not in twins]
    if args.baseline == "timm" and no_twin:
        parser.error(
            f"--baseline timm: timm has no model like {', '.join(no_twin)}; twins exist for {', '.join(twins)}"
        )
    if args.attention == "naive" and any(is_dinov3(a) for a in args.arch):
        parser.error("--attention naive is DINOv2's attention math (no RoPE): not for a DINOv3 preset")
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
