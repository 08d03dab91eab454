"""Training throughput and memory of the Mask2Former segmentation protocol (ViT-Adapter + Mask2Former, frozen backbone).

    python benchmarks/m2f_train.py --arch vit_giant2 --device cuda                 # the paper's 896 px crops
    python benchmarks/m2f_train.py --arch vit_large --device cuda --batch 8
    python benchmarks/m2f_train.py --tiny --threads 1                              # CPU smoke check (seconds)

Prints one JSON object: `arch`, `device`, `crop`, `batch`, `img_s` (training images per second: the forward pass
through the frozen backbone, the adapter and the head, the loss over every decoder stage with its Hungarian
matching, backward and the AdamW step, timed over `--steps` steps after `--warmup`), `step_s`, `peak_mem_gib`
(CUDA; null on the CPU), `trainable_params`, `dtype`, and the protocol's sizes. The head's sizes are the config
defaults (the paper's: 100 queries, width 256, 9 decoder and 6 encoder layers, 12544 points) or, with `--tiny`,
the default suite's smallest; ADE20K's 150 classes, random weights, random images and random masks with
`--classes-per-image` classes per crop (speed does not depend on the values). Out of memory: the JSON says so and
the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package

from components.config import EvaluateConfig  # noqa: E402
from components.evaluation.features import patch_multiple  # noqa: E402
from components.evaluation.mask2former.criterion import semantic_targets  # noqa: E402
from components.evaluation.mask2former.protocol import build_mask2former, param_groups, train_step  # noqa: E402
from components.model import build_backbone  # noqa: E402

TINY = dict(
    m2f_crop_size=56, m2f_num_queries=6, m2f_hidden_dim=32, m2f_decoder_layers=3, m2f_encoder_layers=1,
    m2f_num_points=64, m2f_adapter_inplanes=8, m2f_warmup_iterations=0,
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_giant2", help="backbone preset (vit_test ... vit_giant2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--crop", type=int, default=None, help="crop side in px (default: 896, or 56 with --tiny)")
    p.add_argument("--batch", type=int, default=2, help="crops per step on this device")
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--classes-per-image", type=int, default=10)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-checkpointing", action="store_true", help="keep the frozen blocks' activations")
    p.add_argument("--tiny", action="store_true", help="vit_test and the smallest head: a CPU smoke check")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: PyTorch's default; the protocol "
                   "itself trains with 1)")  # fmt: skip
    return p.parse_args(argv)


def random_batch(batch: int, crop: int, classes: int, per_image: int, device: str, g: torch.Generator):
    """Normalised random images (B, 3, crop, crop) and masks of `per_image` classes in vertical bands."""
    images = torch.randn(batch, 3, crop, crop, generator=g).to(device)
    masks = torch.empty(batch, crop, crop, dtype=torch.long)
    for b in range(batch):
        labels = torch.randperm(classes, generator=g)[:per_image]
        masks[b] = labels[(torch.arange(crop) * per_image // crop)][None, :].expand(crop, crop)
    return images, [semantic_targets(m.to(device), ignore_index=255) for m in masks]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = "vit_test" if args.tiny else args.arch
    cfg = EvaluateConfig(**(TINY if args.tiny else {}), m2f_batch_size=args.batch,
                         m2f_activation_checkpointing=not args.no_checkpointing)  # fmt: skip
    crop = patch_multiple(args.crop or cfg.m2f_crop_size, 14)
    torch.manual_seed(0)
    model = build_mask2former(build_backbone(arch).eval(), args.classes, cfg).to(args.device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.m2f_weight_decay), lr=cfg.m2f_lr, foreach=True)
    g = torch.Generator().manual_seed(0)
    batches = [random_batch(args.batch, crop, args.classes, args.classes_per_image, args.device, g) for _ in range(2)]
    result = {
        "arch": arch, "device": args.device, "crop": crop, "batch": args.batch,
        "dtype": "bf16" if args.device == "cuda" else "fp32",
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "queries": cfg.m2f_num_queries, "hidden_dim": cfg.m2f_hidden_dim, "decoder_layers": cfg.m2f_decoder_layers,
        "encoder_layers": cfg.m2f_encoder_layers, "points": cfg.m2f_num_points, "classes": args.classes,
        "activation_checkpointing": cfg.m2f_activation_checkpointing,
    }  # fmt: skip
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    try:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                sync()
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
            images, targets = batches[step % 2]
            train_step(model, opt, images, targets, num_points=cfg.m2f_num_points, generator=g)
        sync()
    except torch.OutOfMemoryError as err:
        print(json.dumps({**result, "error": f"out of memory: {str(err).splitlines()[0]}"}))
        return 1
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    result.update(img_s=round(args.steps * args.batch / seconds, 3), step_s=round(seconds / args.steps, 4),
                  peak_mem_gib=round(peak, 2) if peak is not None else None, steps=args.steps)  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
