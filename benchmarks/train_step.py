"""Throughput of the full DINOv2 training step: teacher forward, student forward and backward over 2 global and N local
crops, DINO and iBOT heads, the three losses, the optimizer step and the teacher EMA, through the real engine.

    python benchmarks/train_step.py --arch vit_giant2 --batch-per-gpu 16 --device cuda
    python benchmarks/train_step.py --arch vit_test --batch-per-gpu 4 --device cpu --global-size 56 --local-size 28

Prints one JSON object: `arch`, `device`, `batch_per_gpu`, `img_s` (images per second per GPU), `tflops` (achieved
TFLOP/s, counted by PyTorch's FlopCounterMode over one step), `peak_mem_gib`, and the settings. Defaults are the
issue's: patch 14, 2 x 224 px global and 8 x 98 px local crops, 65,536 prototypes (131,072 for vit_giant2), drop
path 0.4 (efficient stochastic depth), bf16 autocast on a GPU, fp32 on the CPU. Batches are random tensors made
once (data loading is not measured); masks follow the release's collate (half the global crops masked).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import load_config, validate_config  # noqa: E402
from components.model import MultiCropCollate  # noqa: E402
from components.training.engine import EngineSettings, TrainEngine  # noqa: E402
from components.training.meta_arch import SSLMetaArch  # noqa: E402
from components.training.plan import pretrain_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_large")
    p.add_argument("--batch-per-gpu", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=None, help="default: 131072 for vit_giant2, else 65536")
    p.add_argument("--drop-path", type=float, default=0.4)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: PyTorch's default)")
    return p.parse_args()


def bench_config(args: argparse.Namespace):  # -> PipelineConfig
    raw = load_config(ROOT / "params.yaml").model_dump(mode="json")
    K = args.prototypes or (131072 if args.arch == "vit_giant2" else 65536)
    big = args.arch == "vit_giant2"
    raw["model"].update(arch=args.arch, drop_path_rate=args.drop_path, patch_size=14)
    raw["dino"].update(head_n_prototypes=K, head_hidden_dim=2048, head_bottleneck_dim=384 if big else 256)
    raw["ibot"].update(
        separate_head=True, head_n_prototypes=K, head_hidden_dim=2048, head_bottleneck_dim=384 if big else 256
    )
    raw["crops"].update(
        global_crops_size=args.global_size, local_crops_size=args.local_size, local_crops_number=args.local_crops
    )
    raw["train"].update(
        batch_size_per_gpu=args.batch_per_gpu, zero_stage=0, precision=args.precision, device=args.device,
        compile=args.compile, activation_checkpointing=args.activation_checkpointing, num_workers=0,
    )  # fmt: skip
    return validate_config(raw)


def random_batch(cfg, generator: torch.Generator) -> dict:
    B, c = cfg.train.batch_size_per_gpu, cfg.crops
    samples = [
        {
            "global_crops": [torch.randn(3, c.global_crops_size, c.global_crops_size, generator=generator)] * 2,
            "local_crops": [torch.randn(3, c.local_crops_size, c.local_crops_size, generator=generator)]
            * c.local_crops_number,
        }
        for _ in range(B)
    ]
    collate = MultiCropCollate(c.global_crops_size // cfg.model.patch_size, tuple(cfg.ibot.mask_ratio_min_max), 0.5)
    return collate(samples)


def main() -> int:
    args = parse_args()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_config(args)
    torch.manual_seed(0)
    plan = pretrain_plan(cfg, world_size=1)
    engine = TrainEngine(SSLMetaArch(plan), EngineSettings.from_plan(plan, cfg.train))
    batch = engine.to_device(random_batch(cfg, torch.Generator().manual_seed(0)))
    schedules = plan.schedules()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    for step in range(args.warmup):
        engine.train_step([batch], schedules.at(step))
    sync()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        engine.train_step([batch], schedules.at(args.warmup))
    flops = counter.get_total_flops()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for step in range(args.steps):
        out = engine.train_step([batch], schedules.at(args.warmup + 1 + step))
    sync()
    step_s = (time.perf_counter() - start) / args.steps
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import psutil

        peak = psutil.Process().memory_info().rss / 2**30
    B = cfg.train.batch_size_per_gpu
    print(
        json.dumps(
            {
                "arch": args.arch,
                "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "batch_per_gpu": B,
                "img_s": round(B / step_s, 3),
                "tflops": round(flops / step_s / 1e12, 4),
                "peak_mem_gib": round(peak, 3),
                "step_s": round(step_s, 4),
                "tflop_per_image": round(flops / B / 1e12, 4),
                "precision": engine.settings.precision,
                "global_crops": [2, args.global_size],
                "local_crops": [args.local_crops, args.local_size],
                "prototypes": cfg.dino.head_n_prototypes,
                "drop_path": args.drop_path,
                "compile": args.compile,
                "activation_checkpointing": args.activation_checkpointing,
                "final_loss": float(out.terms["loss"]),
                "skipped": out.skipped,
            }
        )  # fmt: skip
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
