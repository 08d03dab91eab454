"""Per-module gradient clipping under ZeRO, run by tests/training/test_step_clipping.py on 2 CPU ranks (gloo).

    torchrun --nproc_per_node 2 tests/training/clip_scenario.py --out DIR

For ZeRO stages 1, 2 and 3 in turn, one optimizer step of `TwoModules` (a module with a big gradient and one with a
small gradient; the big module's weight is split between the ranks' flat partitions under ZeRO 1/2 and, above
ZeRO-3's persistence threshold, partitioned like the large weights of a real model) over 2 accumulated micro-batches
per rank, each rank with its own data. The gradients the optimizer receives (gathered with DeepSpeed's
`safe_get_full_grad` just before its step) are compared on rank 0 with the hand computation: the gradient averaged
over every rank's and micro-batch's loss, written out here on one process, each module scaled by
min(1, clip / (||g_module|| + 1e-6)). Writes `<out>/result.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components.model import param_groups
from components.training.engine import EngineSettings, TrainEngine, init_distributed
from components.training.module import LossOutput, TrainModule

CLIP = 1.0
MICRO, ACCUM = 3, 2
IN = 300


class TwoModules(TrainModule):
    """`big`'s loss is scaled by 100 and `small`'s by 0.01: their gradient norms lie on either side of `CLIP`."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(IN, 400)  # 120 000 weights: above ZeRO-3's persistence threshold of 100 000
        self.small = nn.Linear(4, 2)

    def forward(self, batch: Mapping[str, Any], values: Mapping[str, float]) -> LossOutput:
        x = batch["x"]  # (B, IN)
        big = 100.0 * self.big(x).square().mean()
        small = 0.01 * self.small(x[:, :4]).square().mean()
        return {"loss": big + small, "big": big.detach(), "small": small.detach()}

    def optim_param_groups(
        self, *, layerwise_decay: float, patch_embed_lr_mult: float, dino_head_wd_multiplier: float = 1.0
    ) -> list[dict[str, Any]]:
        return param_groups(self)

    def clip_modules(self) -> Mapping[str, nn.Module]:
        return {"big": self.big, "small": self.small}


def batches(rank: int) -> list[dict[str, Tensor]]:
    """Rank `rank`'s micro-batches, from a seed of its own (every rank can rebuild every rank's)."""
    gen = torch.Generator().manual_seed(100 + rank)
    return [{"x": torch.randn(MICRO, IN, generator=gen)} for _ in range(ACCUM)]


def settings(stage: int, clip: float = CLIP) -> EngineSettings:
    return EngineSettings(
        zero_stage=stage, device="cpu", precision="fp32", micro_batch_size=MICRO, grad_accum_steps=ACCUM,
        clip_grad=clip, betas=(0.9, 0.999), layerwise_decay=1.0, patch_embed_lr_mult=1.0,
    )  # fmt: skip


VALUES = {"lr": 0.1, "last_layer_lr": 0.1, "weight_decay": 0.0, "momentum": 0.5, "teacher_temp": 0.07}


def reference_gradients(module: TwoModules, world: int) -> dict[str, Tensor]:
    """The gradient of the mean over ranks and micro-batches of the loss, unclipped, by parameter name."""
    module.zero_grad(set_to_none=True)
    for rank in range(world):
        for batch in batches(rank):
            (module(batch, VALUES)["loss"] / (world * ACCUM)).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def clipped(grads: Mapping[str, Tensor], clip: float) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Each module's gradients times min(1, clip / (its norm + 1e-6)), and the norms: the hand computation."""
    out, norms = {}, {}
    for module in ("big", "small"):
        names = [n for n in grads if n.startswith(f"{module}.")]
        norm = float(torch.cat([grads[n].flatten() for n in names]).norm())
        norms[module] = norm
        out.update({n: grads[n] * min(1.0, clip / (norm + 1e-6)) for n in names})
    return out, norms


def run_stage(stage: int, world: int, rank: int) -> dict[str, Any]:
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(0)
    module = TwoModules()
    reference = TwoModules()
    reference.load_state_dict(module.state_dict())
    expected, norms = clipped(reference_gradients(reference, world), CLIP)
    engine = TrainEngine(module, settings(stage))
    seen: dict[str, Tensor] = {}
    step = engine.ds.step

    def capture_then_step(*args: Any, **kwargs: Any) -> Any:
        if engine.ds.is_gradient_accumulation_boundary():  # after the engine's clipping, before the optimizer's step
            for name, p in engine.module.named_parameters():
                seen[name] = safe_get_full_grad(p).detach().clone()
        return step(*args, **kwargs)

    engine.ds.step = capture_then_step
    before = engine.full_model_state()
    out = engine.train_step(batches(rank), VALUES)
    after = engine.full_model_state()
    result = {
        "skipped": out.skipped,
        "module_norms": out.module_norms,
        "grad_norm": out.grad_norm,
        "expected_norms": norms,
        "max_error": max(float((seen[n] - expected[n]).abs().max()) for n in expected),
        "max_value": max(float(v.abs().max()) for v in expected.values()),
        "small_unclipped": norms["small"] < CLIP,
        "big_clipped": norms["big"] > CLIP,
    }
    if rank == 0:
        result["moved"] = all(not torch.equal(before[k], after[k]) for k in before)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    rank, world = init_distributed("cpu")
    results = {stage: run_stage(stage, world, rank) for stage in (1, 2, 3)}
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps({"world": world, "stages": results}, indent=2))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
