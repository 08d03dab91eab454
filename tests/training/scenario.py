"""Multi-rank training scenarios run by the tests in subprocesses (DeepSpeed on the CPU, gloo).

    torchrun --nproc_per_node 2 tests/training/scenario.py zero --stage 3 --manifest M --out DIR
    python tests/training/scenario.py single --manifest M --out DIR --load DIR_OF_THE_ZERO3_RUN/ckpt

`zero`: 3 steps of ZeRO stage `--stage` on 2 ranks (batch 4 each) recording the losses, a checkpoint, then a step
whose input is NaN on rank 1 only. `single`: the same 3 steps on 1 rank without ZeRO (batch 8), a NaN step, the
guard's stop after consecutive non-finite steps, and loading the 2-rank checkpoint. Each writes `<out>/result.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from components.config import PipelineConfig, load_config, validate_config
from components.training.checkpoint import CheckpointManager, LoopState
from components.training.data import build_loader, read_manifest_uris
from components.training.engine import EngineSettings, TrainEngine, all_reduce_mean, init_distributed
from components.training.loop import LoopSettings, NonFiniteError, train
from components.training.meta_arch import SSLMetaArch
from components.training.plan import PhasePlan, pretrain_plan

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 8
STEPS = 3


def tiny_config(zero_stage: int, batch: int, precision: str = "fp32") -> PipelineConfig:
    """vit_test, 28 px global / 14 px local crops, small heads, every loss on (KoLeo over the global batch)."""
    raw = load_config(ROOT / "params.yaml").model_dump(mode="json")
    # The paper's LayerScale init and teacher momentum, not the demo's: the runs agree up to float summation order,
    # and with the demo's larger gammas those differences reach 0.13 % of the loss at the third step (tolerance 0.1 %).
    raw["model"].update(arch="vit_test", drop_path_rate=0.0, layerscale_init=1e-5)
    raw["teacher"].update(momentum_teacher=0.992)
    raw["dino"].update(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16, koleo_distributed=True)
    raw["ibot"].update(separate_head=True, head_n_prototypes=48, head_hidden_dim=32, head_bottleneck_dim=16)
    raw["crops"].update(global_crops_size=28, local_crops_size=14, local_crops_number=2)
    # The prototypes (directions and trained norms) learn from the first step: no last-layer freeze.
    raw["optim"].update(epochs=2, epoch_length=5, warmup_epochs=1, base_lr=0.05, freeze_last_layer_epochs=0)
    raw["teacher"].update(warmup_teacher_temp_epochs=1)
    raw["train"].update(
        batch_size_per_gpu=batch, zero_stage=zero_stage, num_workers=0, device="cpu", cpu_threads=1, precision=precision
    )
    return validate_config(raw)


def plan_of(cfg: PipelineConfig) -> PhasePlan:
    """The pretrain plan at this process's world size (the per-rank batch is the config's)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return pretrain_plan(cfg, world_size=world)


def build(cfg: PipelineConfig, state: dict | None = None) -> TrainEngine:
    torch.manual_seed(cfg.seed)
    plan = plan_of(cfg)
    return TrainEngine(SSLMetaArch(plan), EngineSettings.from_plan(plan, cfg.train), initial_state=state)


def loader(engine: TrainEngine, manifest: str, start: int = 0, rank: int | None = None, world: int | None = None):
    uris = read_manifest_uris(manifest)
    rank, world = (engine.rank, engine.world_size) if rank is None else (rank, world)
    plan = engine.module.plan
    return iter(build_loader(uris=uris, plan=plan, rank=rank, world_size=world, start_position=start, num_workers=0))


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_steps(engine: TrainEngine, cfg: PipelineConfig, manifest: str, nan_step: int, nan_rank: int) -> dict:
    """STEPS normal steps (losses recorded), then one step with a NaN input on `nan_rank`."""
    batches = loader(engine, manifest)
    schedules = engine.module.plan.schedules()
    result: dict = {"losses": [], "grad_norms": [], "ema_error": 0.0}
    previous = engine.full_model_state()
    for step in range(STEPS + 1):
        batch = next(batches)
        if step == nan_step:
            if engine.rank == nan_rank:
                batch["collated_global_crops"][0, 0, 0, 0] = float("nan")
            before_model, before_opt = engine.full_model_state(), engine.full_optimizer_state()
        out = engine.train_step([batch], schedules.at(step))
        terms = {k: float(all_reduce_mean(v.clone())) for k, v in out.terms.items()}
        if step == nan_step:
            after_model, after_opt = engine.full_model_state(), engine.full_optimizer_state()
            result["nan_step_skipped"] = out.skipped
            if engine.rank == 0:
                student = [k for k in after_model if not k.startswith("teacher.")]  # the EMA still runs
                result["nan_weights_unchanged"] = equal_states(
                    {k: before_model[k] for k in student}, {k: after_model[k] for k in student}
                )
                result["nan_moments_unchanged"] = equal_states(before_opt["exp_avg"], after_opt["exp_avg"])
                result["finite_after_nan"] = all(torch.isfinite(v).all().item() for v in after_model.values())
        else:
            result["losses"].append(terms)
            result["grad_norms"].append(out.grad_norm)
            current = engine.full_model_state()
            if engine.rank == 0:  # the teacher is the EMA of the student, every parameter, at every step
                result["ema_error"] = max(result["ema_error"], ema_error(previous, current, schedules.at(step)))
            previous = current
        if step == STEPS - 1:
            result["state"] = (engine.full_model_state(), engine.full_optimizer_state())
            if engine.rank == 0:  # the prototypes' norms after the steps, student and EMA teacher
                result["weight_g"] = {
                    k: v.flatten().tolist() for k, v in result["state"][0].items() if k.endswith("last_layer.weight_g")
                }
    return result


def ema_error(before: dict, after: dict, values: dict) -> float:
    """The largest |teacher - (m teacher_before + (1 - m) student)| over the teacher's parameters after a step."""
    m = values["momentum"]
    errors = [
        float((m * before[k] + (1 - m) * after["student." + k.removeprefix("teacher.")] - after[k]).abs().max())
        for k in after
        if k.startswith("teacher.")
    ]
    return max(errors)


def save(engine: TrainEngine, cfg: PipelineConfig, state: tuple, out: Path) -> None:
    if engine.rank == 0:
        manager = CheckpointManager(out / "ckpt", keep_last=2, fingerprint="scenario")
        loop = {"step": STEPS, "samples_seen": STEPS * GLOBAL_BATCH, "skipped_steps": 0, "nonfinite_in_a_row": 0,
                "decode_failures": 0}  # fmt: skip
        manager.save({"model": state[0], "optimizer": state[1], "loop": loop, "rng": [], "history": []}, STEPS)


def guard_stops(engine: TrainEngine, cfg: PipelineConfig, manifest: str, out: Path) -> dict:
    """Non-finite steps in a row stop the loop with NonFiniteError; the checkpoint on disk stays the newest."""
    batches = loader(engine, manifest, rank=0, world=1)

    def poisoned():
        while True:
            batch = next(batches)
            batch["collated_local_crops"][:] = float("inf")
            yield batch

    manager = CheckpointManager(out / "ckpt", keep_last=2, fingerprint="scenario")
    before = manager.latest()
    settings = LoopSettings(total_steps=10, log_period=1, checkpoint_period=1, max_nonfinite_steps=2)
    try:
        train(
            engine, poisoned(), engine.module.plan.schedules(), LoopState(step=STEPS), settings,
            save_checkpoint=lambda s: manager.save({"loop": vars(s)}, s.step), log_metrics=lambda r, s: None,
        )  # fmt: skip
    except NonFiniteError as err:
        return {"stopped": True, "message": str(err), "checkpoint_intact": manager.latest() == before}
    return {"stopped": False}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=("zero", "single"))
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--load", type=Path)
    args = parser.parse_args()
    zero3 = args.scenario == "zero"
    cfg = tiny_config(args.stage if zero3 else 0, GLOBAL_BATCH // 2 if zero3 else GLOBAL_BATCH, args.precision)
    init_distributed("cpu")
    engine = build(cfg)
    result = run_steps(engine, cfg, args.manifest, nan_step=STEPS, nan_rank=1 if zero3 else 0)
    state = result.pop("state")
    if zero3:
        save(engine, cfg, state, args.out)
    else:
        result["guard"] = guard_stops(engine, cfg, args.manifest, args.out)
    if args.load:  # a checkpoint saved by other ranks and stage (2 ZeRO-3 ranks), loaded here
        saved = CheckpointManager.load(CheckpointManager(args.load, keep_last=1, fingerprint="").complete()[-1][1])
        loaded = build(cfg, state=saved)
        model, opt = loaded.full_model_state(), loaded.full_optimizer_state()
        batches = loader(loaded, args.manifest, start=STEPS * GLOBAL_BATCH)
        step = loaded.train_step([next(batches)], loaded.module.plan.schedules().at(STEPS))
        result["loaded_then_trains"] = not step.skipped and math.isfinite(step.grad_norm)
        if engine.rank == 0:
            result["loaded_model_equal"] = equal_states(model, saved["model"])
            result["loaded_moments_equal"] = equal_states(opt["exp_avg"], saved["optimizer"]["exp_avg"])
            result["loaded_step"] = opt["step"] == saved["optimizer"]["step"]
    if engine.rank == 0:
        result["grad_norms"] = [g if math.isfinite(g) else None for g in result["grad_norms"]]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
