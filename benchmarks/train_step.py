"""Throughput of the full DINOv2 training step, beside a same-run baseline: teacher forward, student forward and
backward over 2 global and N local crops, DINO and iBOT heads, the three losses, the optimizer step and the teacher
EMA, through the real engine.

    python benchmarks/train_step.py --arch vit_giant2 --batch-per-gpu 16 --device cuda --baseline timm
    python benchmarks/train_step.py --arch vit_giant2 --batch-per-gpu 16 --device cuda --profile results/profile
    python benchmarks/train_step.py --arch vit_test --batch-per-gpu 8 --device cpu --global-size 56 --local-size 28 \
        --prototypes 1024 --steps 4 --repeats 2 --baseline timm --with-data
    python benchmarks/train_step.py --arch dinov3_vitl16 --batch-per-gpu 16 --device cuda --drop-path 0.1 \
        --gram --baseline no-gram                                  # Gram anchoring's cost, 512 px Gram teacher

Timing: `--warmup` steps (compilation, autotuning), then `--repeats` runs of `--steps` steps, reported as the median
with min and max; every step gets its own batch (random crops; masks drawn by the training collate, so the masked
crops and patch counts vary as in training). The host synchronises with the device only around each repeat.

`--baseline timm` measures timm's DINOv2 ViT of the same size (`vit_large_patch14_dinov2`,
`vit_giant_patch14_dinov2`; random weights; timm is the `bench` extra) in the same process, as a backbone-only step:
a no-grad teacher forward on the global crops, the student's forward and backward on every crop, a fused AdamW step;
`ratio` is ours over it. `--with-data` times the step fed by the real loader (`train.num_workers` workers over a
rendered synthetic world) and reports how long the step waited for data. `--profile DIR` writes a torch.profiler trace
and a summary of where the step's time goes (timing.profile_steps).

`--gram` adds Gram anchoring (DINOv3, section 4.2) to the step, with params.yaml's `gram` section (weight, tokens,
image or batch level; `--gram-resolution` overrides `gram.teacher_resolution`): a frozen Gram teacher (a copy of the
backbone) runs on each global crop's region at that multiple of the crop size, its patch features are resized to
the student's grid and the Gram loss joins the step's total (`final_gram_loss`). `--baseline no-gram` measures the
same step with Gram off in the same process (same plan otherwise, same batches without the Gram teacher's crops):
`ratio` is the Gram step's images/s over it, the share of the speed that Gram anchoring keeps.

Prints one JSON object. Defaults are the ViT-g/14 goal's: patch 14, 2 x 224 px global and 8 x 98 px local crops,
131,072 prototypes for vit_giant2 (65,536 otherwise), bottleneck 384, drop path 0.4 (efficient stochastic depth),
bf16 autocast on a GPU, fp32 on the CPU. A DINOv3 preset (`dinov3_vitl16`, ...) keeps its patch 16 and storage
tokens, with the release's crops for patch 16 by default: 2 x 256 px and 8 x 112 px.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm_twins  # noqa: E402
from timing import profile_steps, repeated_rate, sync  # noqa: E402

from components.config import DINOV2_ONLY, PipelineConfig, gram_crops_size, load_config, validate_config  # noqa: E402
from components.model import MultiCropCollate, backbone_config  # noqa: E402
from components.training.engine import EngineSettings, TrainEngine  # noqa: E402
from components.training.gram import gram_plan  # noqa: E402
from components.training.meta_arch import SSLMetaArch  # noqa: E402
from components.training.plan import PhasePlan, pretrain_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_large")
    p.add_argument("--batch-per-gpu", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--global-size", type=int, default=None, help="default: 224 (DINOv2), 256 (DINOv3)")
    p.add_argument("--local-size", type=int, default=None, help="default: 98 (DINOv2), 112 (DINOv3)")
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=None, help="default: 131072 for vit_giant2, else 65536")
    p.add_argument("--drop-path", type=float, default=0.4)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--pack-crops", action="store_true", help="train.pack_crops: global + local crops per block")
    p.add_argument("--attention", choices=("auto", "flash", "efficient", "cudnn", "math"), default="auto",
                   help="the SDPA backend to force (auto: PyTorch's choice)")  # fmt: skip
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baseline", choices=("none", "timm", "no-gram"), default="none",
                   help="timm's backbone-only step, or (with --gram) the same step with Gram off")  # fmt: skip
    p.add_argument("--gram", action="store_true", help="Gram anchoring on (params.yaml's gram section)")
    p.add_argument("--gram-resolution", type=float, default=None, help="gram.teacher_resolution (default: params)")
    p.add_argument("--with-data", action="store_true", help="also time the step fed by the real loader")
    p.add_argument("--num-workers", type=int, default=8, help="loader workers of --with-data")
    p.add_argument("--data-images", type=int, default=512, help="pool images rendered for --with-data")
    p.add_argument("--data-image-size", type=int, default=256, help="their side, px (JPEG/PNG decoded per sample)")
    p.add_argument("--profile", type=Path, default=None, help="write a profiler trace and summary into this folder")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: PyTorch's default)")
    args = p.parse_args(argv)
    dinov3 = args.arch.startswith("dinov3_")
    args.global_size = args.global_size or (256 if dinov3 else 224)
    args.local_size = args.local_size or (112 if dinov3 else 98)
    if args.baseline == "no-gram" and not args.gram:
        p.error("--baseline no-gram is the Gram step's baseline: add --gram")
    return args


def bench_config(args: argparse.Namespace) -> PipelineConfig:
    raw = load_config(ROOT / "params.yaml").model_dump(mode="json")
    K = args.prototypes or (131072 if args.arch == "vit_giant2" else 65536)
    bottleneck = 384 if args.arch == "vit_giant2" else 256
    if args.arch.startswith("dinov3_"):  # the preset's patch and storage tokens, none of DINOv2's keys
        geometry = {"patch_size": None, "num_register_tokens": None}
        for key in DINOV2_ONLY:
            raw["model"].pop(key, None)
        raw["highres"].update(global_crops_size=2 * args.global_size, local_crops_size=args.local_size)  # unused
    else:
        geometry = {"patch_size": 14}
    raw["model"].update(arch=args.arch, drop_path_rate=args.drop_path, layerscale_init=1e-5, **geometry)
    raw["dino"].update(head_n_prototypes=K, head_hidden_dim=2048, head_bottleneck_dim=bottleneck)
    raw["ibot"].update(separate_head=True, head_n_prototypes=K, head_hidden_dim=2048, head_bottleneck_dim=bottleneck)
    raw["crops"].update(
        global_crops_size=args.global_size, local_crops_size=args.local_size, local_crops_number=args.local_crops
    )
    raw["optim"].update(freeze_last_layer_epochs=0)
    raw["train"].update(
        batch_size_per_gpu=args.batch_per_gpu, zero_stage=0, precision=args.precision, device=args.device,
        compile=args.compile, activation_checkpointing=args.activation_checkpointing, num_workers=args.num_workers,
        pack_crops=args.pack_crops,
    )  # fmt: skip
    return validate_config(raw)


def step_plan(args: argparse.Namespace, cfg: PipelineConfig, gram: bool) -> PhasePlan:
    """The main pretraining phase's plan; with `gram`, the same plan with Gram anchoring from the `gram` section (the
    Gram teacher: the starting model, as in continued pretraining)."""
    plan = pretrain_plan(cfg, world_size=1)
    if not gram:
        return plan
    section = cfg.gram.model_copy(update={"enabled": True})
    if args.gram_resolution is not None:
        section = section.model_copy(update={"teacher_resolution": args.gram_resolution})
    side = gram_crops_size(section.teacher_resolution, cfg.crops.global_crops_size)
    if side % cfg.model.patch_size:
        raise SystemExit(
            f"--gram-resolution / gram.teacher_resolution = {section.teacher_resolution} makes the Gram teacher's "
            f"crops {side} px: not a multiple of the patch size {cfg.model.patch_size}"
        )
    return dataclasses.replace(plan, gram=gram_plan(section, global_crops_size=cfg.crops.global_crops_size))


def random_batches(cfg: PipelineConfig, count: int, device: torch.device, gram_crops: int | None = None) -> list[dict]:
    """`count` collated batches of random crops, masks drawn by the training collate (ratios and counts vary), seeded:
    the same in every call; with `gram_crops`, each global crop's Gram teacher crop of that side too
    (`collated_gram_teacher_crops`)."""
    c, B = cfg.crops, cfg.train.batch_size_per_gpu
    collate = MultiCropCollate(
        c.global_crops_size // cfg.model.patch_size, tuple(cfg.ibot.mask_ratio_min_max),
        cfg.ibot.mask_sample_probability, rng=random.Random(0),  # the same masks in every call
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    gram_generator = torch.Generator().manual_seed(1)  # its own: the crops are the same with and without Gram
    batches = []
    for _ in range(count):
        glob = torch.randn(2, B, 3, c.global_crops_size, c.global_crops_size, generator=generator)
        local = torch.randn(c.local_crops_number, B, 3, c.local_crops_size, c.local_crops_size, generator=generator)
        samples = [{"global_crops": list(glob[:, b]), "local_crops": list(local[:, b])} for b in range(B)]
        if gram_crops:
            teacher = torch.randn(2, B, 3, gram_crops, gram_crops, generator=gram_generator)
            for b, sample in enumerate(samples):
                sample["gram_teacher_crops"] = list(teacher[:, b])
        batches.append(to_device(collate(samples), device))
    return batches


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    return sdpa_kernel(backends[name])


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    import psutil

    return round(psutil.Process().memory_info().rss / 2**30, 3)


def measure_ours(
    args: argparse.Namespace, cfg: PipelineConfig, device: torch.device, gram: bool = False, extras: bool = True
) -> dict[str, Any]:
    """This project's full step through the engine (with Gram anchoring when `gram`); `extras`: also the profile and
    the loader-fed step when asked (not for a baseline)."""
    plan = step_plan(args, cfg, gram)
    torch.manual_seed(0)
    engine = TrainEngine(SSLMetaArch(plan), EngineSettings.from_plan(plan, cfg.train))
    schedules = plan.schedules()
    gram_crops = plan.gram.teacher_crops_size if plan.gram is not None else None
    batches = random_batches(cfg, args.warmup + args.steps, device, gram_crops)
    outputs: list[Any] = []

    def step(i: int) -> None:
        outputs[:] = [engine.train_step([batches[i % len(batches)]], schedules.at(i))]

    from torch.utils.flop_counter import FlopCounterMode

    step(0)  # a first step outside the counter: lazy state (optimizer moments, compilation)
    with FlopCounterMode(display=False) as counter:
        step(1)
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    B = args.batch_per_gpu
    rate = repeated_rate(step, items=B, device=device, warmup=args.warmup, steps=args.steps, repeats=args.repeats)
    out = outputs[-1]
    result = {
        "img_s": rate,
        "tflops": round(flops * rate["median"] / B / 1e12, 3),
        "tflop_per_image": round(flops / B / 1e12, 4),
        "peak_mem_gib": peak_memory_gib(device),
        "final_loss": float(out.terms["loss"]),
        "skipped": out.skipped,
        "precision": engine.settings.precision,
    }
    if plan.gram is not None:
        result["final_gram_loss"] = float(out.terms["gram_loss"])
    if extras and args.profile is not None:
        result["profile"] = profile_steps(step, device=device, steps=5, out_dir=args.profile / "ours")
    if extras and args.with_data:
        result["with_data"] = measure_with_data(engine, plan, cfg, schedules, device, args)
    return result


def measure_with_data(engine, plan, cfg, schedules, device, args) -> dict[str, Any]:  # noqa: ANN001
    """The step fed by the training loader over a rendered synthetic world: images/s and the time spent waiting."""
    import pandas as pd

    from components.synthetic import render_world
    from components.training.data import build_loader

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        world = Path(tmp) / "world"
        synthetic = cfg.synthetic.model_copy(update={"image_size": args.data_image_size, "pool_size": args.data_images})
        render_world(synthetic, cfg.seed, world)
        uris = sorted(str(p) for p in (world / "pool").rglob("*") if p.is_file())
        pd.DataFrame({"uri": uris}).to_parquet(Path(tmp) / "manifest.parquet")
        loader = iter(build_loader(uris=uris, plan=plan, rank=0, world_size=1, start_position=0,
                                   num_workers=args.num_workers, pin_memory=device.type == "cuda"))  # fmt: skip
        for i in range(args.warmup):
            engine.train_step([next(loader)], schedules.at(i))
        sync(device)
        waited, start = 0.0, time.perf_counter()
        for i in range(args.steps):
            t0 = time.perf_counter()
            batch = next(loader)
            waited += time.perf_counter() - t0
            engine.train_step([batch], schedules.at(args.warmup + i))
        sync(device)
        elapsed = time.perf_counter() - start
    return {
        "img_s": round(args.batch_per_gpu * args.steps / elapsed, 3),
        "data_wait_share": round(waited / elapsed, 4),
        "keeps_up": waited / elapsed < 0.05,
        "num_workers": args.num_workers,
    }


def measure_timm(args: argparse.Namespace, cfg: PipelineConfig, device: torch.device) -> dict[str, Any]:
    """timm's model of the same size as a backbone-only step (see the module docstring)."""
    import timm

    torch.manual_seed(0)
    if args.arch in timm_twins.TIMM_DINOV3:  # timm's DINOv3 model of our preset's architecture
        cfg3 = backbone_config(args.arch, drop_path_rate=args.drop_path)
        name, student = timm_twins.timm_name(args.arch, cfg3), timm_twins.dinov3_twin(args.arch, cfg3)
    else:
        name = timm_twins.TIMM_DINOV2[args.arch]
        student = timm.create_model(name, pretrained=False, dynamic_img_size=True, drop_path_rate=args.drop_path)
    student = student.to(device).train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    if args.compile:
        for model in (student, teacher):
            for block in model.blocks:
                block.compile()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)
    bf16 = device.type == "cuda" and args.precision != "fp32"
    batches = random_batches(cfg, args.warmup + args.steps, device)

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                teacher.forward_features(batch["collated_global_crops"])
            g = student.forward_features(batch["collated_global_crops"])
            local = student.forward_features(batch["collated_local_crops"])
            loss = g.float().mean() + local.float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    B = args.batch_per_gpu
    rate = repeated_rate(step, items=B, device=device, warmup=args.warmup, steps=args.steps, repeats=args.repeats)
    result = {"model": name, "timm": timm.__version__, "img_s": rate, "peak_mem_gib": peak_memory_gib(device)}
    if args.profile is not None:
        result["profile"] = profile_steps(step, device=device, steps=5, out_dir=args.profile / "timm")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = bench_config(args)
    record: dict[str, Any] = {
        "arch": args.arch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch_per_gpu": args.batch_per_gpu,
        "global_crops": [2, args.global_size],
        "local_crops": [args.local_crops, args.local_size],
        "prototypes": cfg.dino.head_n_prototypes,
        "drop_path": args.drop_path,
        "compile": args.compile,
        "pack_crops": args.pack_crops,
        "attention": args.attention,
        "activation_checkpointing": args.activation_checkpointing,
    }
    if args.gram:
        gram = step_plan(args, cfg, gram=True).gram
        record["gram"] = {
            "teacher_crops": [2, gram.teacher_crops_size],
            "loss_weight": gram.loss_weight,
            "tokens": gram.tokens,
            "img_level": gram.img_level,
            "remove_neg": gram.remove_neg,
        }
    with attention_backend(args.attention):
        record["ours"] = measure_ours(args, cfg, device, gram=args.gram)
        if args.baseline != "none":
            gc.collect()  # the first engine's memory back before the baseline's peak is measured
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if args.baseline == "timm":
                record["baseline"] = measure_timm(args, cfg, device)
            else:
                record["baseline"] = {"model": "ours, gram off", **measure_ours(args, cfg, device, extras=False)}
            record["ratio"] = round(record["ours"]["img_s"]["median"] / record["baseline"]["img_s"]["median"], 3)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
