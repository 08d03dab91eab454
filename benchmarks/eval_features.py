"""Evaluation throughput: frozen-feature extraction images/s and the time of each evaluation task, for one preset.

    python benchmarks/eval_features.py --arch vit_tiny --device cpu                 # the demo's settings (56 px)
    python benchmarks/eval_features.py --arch vit_large --device cuda               # 224 px, bf16 autocast
    python benchmarks/eval_features.py --arch vit_giant2 --device cuda --world data/synthetic

Prints one JSON object: `arch`, `device`, `img_s` (feature extraction: `get_intermediate_layers` of the last 4
blocks with CLS tokens, the call every image-level task makes, timed on a batch after warm-up), `task_s` (seconds of
each evaluation task of `components.evaluation.runner.evaluate_model` with params.yaml's `evaluate` section on the
synthetic world: `features` is the shared classification forward pass, each other entry a task including its own
forward passes and head training), the image sizes, batch, dtype and context. The backbone is a seeded random
initialisation: throughput does not depend on the weights. `--world` reuses a rendered world (default: render
params.yaml's `synthetic` section into a temporary folder first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package

from components.config import load_config  # noqa: E402
from components.evaluation.datasets import load_eval_datasets  # noqa: E402
from components.evaluation.features import extract_features, patch_multiple  # noqa: E402
from components.evaluation.models import ModelSpec, build_model  # noqa: E402
from components.evaluation.runner import ImageCache, evaluate_model  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def feature_img_s(model: torch.nn.Module, side: int, batch: int, device: str, iters: int) -> float:
    """Images per second of the image-level feature extraction on random uint8 images of `side` px."""
    images = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8).numpy()
    extract_features(model, images, n_blocks=4, batch_size=batch, device=device)  # warm-up (kernels, allocator)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        extract_features(model, images, n_blocks=4, batch_size=batch, device=device)
    _sync(device)
    return iters * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, help="backbone preset (vit_test ... vit_giant2)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--params", default="params.yaml", help="params file (evaluate and synthetic sections)")
    parser.add_argument("--world", default=None, help="a rendered raw layout to evaluate on (default: render one)")
    parser.add_argument("--image-size", type=int, default=None, help="crop side (default: 224 on cuda, params on cpu)")
    parser.add_argument("--dense-size", type=int, default=None, help="dense side (default: 448 on cuda, params on cpu)")
    parser.add_argument("--batch", type=int, default=None, help="feature batch (default: 128 on cuda, params on cpu)")
    parser.add_argument("--iters", type=int, default=None, help="timed batches for img_s (default: 20 cuda, 3 cpu)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="corruption rendering processes (default: every CPU core on cuda, params on cpu)",
    )
    parser.add_argument("--no-tasks", action="store_true", help="only measure img_s")
    args = parser.parse_args(argv)

    root = Path(__file__).resolve().parents[1]
    params = Path(args.params) if Path(args.params).is_file() else root / args.params
    cfg = load_config(params)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    image_size = args.image_size or (224 if cuda else cfg.evaluate.image_size)
    dense_size = args.dense_size or (448 if cuda else cfg.evaluate.dense_image_size or image_size)
    batch = args.batch or (128 if cuda else cfg.evaluate.batch_size)
    workers = args.workers or (min(os.cpu_count() or 1, 64) if cuda else cfg.evaluate.num_workers)
    evaluate_cfg = cfg.evaluate.model_copy(
        update={
            "image_size": image_size, "dense_image_size": dense_size, "batch_size": batch, "device": args.device,
            "num_workers": workers,
        }
    )  # fmt: skip

    spec = ModelSpec(name=args.arch, arch=args.arch, role="benchmark", weights=None)
    model = build_model(spec, seed=cfg.seed).to(args.device)
    side = patch_multiple(image_size, int(model.patch_size))
    img_s = feature_img_s(model, side, batch, args.device, args.iters or (20 if cuda else 3))

    task_s: dict[str, float] = {}
    world_info: dict[str, int] = {}
    if not args.no_tasks:
        with tempfile.TemporaryDirectory() as tmp:
            world = args.world
            if world is None:
                from components.synthetic import render_world

                world = str(Path(tmp) / "world")
                render_world(cfg.synthetic, cfg.seed, world)
            data = load_eval_datasets(world)
            world_info = data.counts
            cache = ImageCache(data, evaluate_cfg, cfg.seed)
            start = time.perf_counter()
            result = evaluate_model(model, spec, data, evaluate_cfg, cache, seed=cfg.seed, device=args.device)
            _sync(args.device)
            task_s = {k: round(v, 3) for k, v in result.timing.items() if k not in ("img_s", "images")}
            task_s["total"] = round(time.perf_counter() - start, 3)
            task_s["corruption_render"] = round(cache.render_s, 3)

    record = {
        "arch": args.arch,
        "device": args.device,
        "img_s": round(img_s, 1),
        "task_s": task_s,
        "image_size": side,
        "dense_image_size": patch_multiple(dense_size, int(model.patch_size)),
        "batch": batch,
        "dtype": "bf16-autocast" if cuda else "fp32",
        "workers": workers,
        "tasks": list(evaluate_cfg.tasks),
        "eval_images": world_info,
        "context": {
            "card": torch.cuda.get_device_name() if cuda else None,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
