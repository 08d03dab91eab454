"""Step time of one distillation run with two students against two single-student runs, on the same data.

    python benchmarks/distill_step.py
    python benchmarks/distill_step.py --teacher vit_giant2 --students vit_small vit_base --batch-per-gpu 32 \
        --global-size 224 --local-size 98 --local-crops 8 --prototypes 131072 --device cuda

Builds three engines in one process, each the real `DistillMetaArch` under the real `TrainEngine` (ZeRO 0, fp32 on
the CPU, bf16 autocast on a GPU): one with both students, one per student alone, all with the same frozen teacher
(random weights: the cost does not depend on them) and the same collated batch (random crops, made once; data loading
is not measured). Steps are interleaved (two-student, first alone, second alone, ...) so that a change in machine
load hits all three alike; each time is the median over `--steps`.

Prints one JSON object: `two_students_s` (one step of the two-student run), `two_single_runs_s` (the sum of the two
single-student steps), `ratio` (their quotient: 0.5 when the teacher is everything, 1 when it is free),
`single_run_s` per student, `teacher_forward_s` (the teacher's pass alone: what the shared run saves once per
batch), the settings and the machine's load average. The default setup is the paper's shape at CPU scale: ViT-g/14
(1.1B parameters) distilled into ViT-S/14 (22M) and ViT-B/14 (86M) becomes vit_large (304M) into vit_tiny (5.5M) and
vit_small (22M), with 2 global 56 px and 4 local 28 px crops (the students see 1.6x the teacher's tokens; 1.8x with
the paper's 224 / 98 px crops), batch 16, 4096 prototypes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import PipelineConfig, load_config, validate_config  # noqa: E402
from components.model import MultiCropCollate  # noqa: E402
from components.training.distill import DistillMetaArch  # noqa: E402
from components.training.engine import EngineSettings, TrainEngine  # noqa: E402
from components.training.plan import PhasePlan, WeightsPlan, distill_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="vit_large")
    p.add_argument("--students", nargs=2, default=["vit_tiny", "vit_small"])
    p.add_argument("--batch-per-gpu", type=int, default=16)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--global-size", type=int, default=56)
    p.add_argument("--local-size", type=int, default=28)
    p.add_argument("--local-crops", type=int, default=4)
    p.add_argument("--prototypes", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: PyTorch's default)")
    return p.parse_args()


def bench_config(args: argparse.Namespace, students: list[str]) -> PipelineConfig:
    raw = load_config(ROOT / "params.yaml").model_dump(mode="json")
    raw["model"].update(arch=args.teacher, patch_size=14)
    raw["dino"].update(head_n_prototypes=args.prototypes)
    raw["ibot"].update(head_n_prototypes=args.prototypes)
    raw["crops"].update(
        global_crops_size=args.global_size, local_crops_size=args.local_size, local_crops_number=args.local_crops
    )
    raw["train"].update(batch_size_per_gpu=args.batch_per_gpu, zero_stage=0, device=args.device, num_workers=0)
    raw["distill"].update(students=students)
    return validate_config(raw)


def bench_plan(cfg: PipelineConfig) -> PhasePlan:
    """The distill phase with the `model` preset as its (randomly initialised) teacher."""
    return distill_plan(cfg, world_size=1, teacher=cfg.model, weights=WeightsPlan("random"))


def random_batch(cfg: PipelineConfig, generator: torch.Generator) -> dict:
    c = cfg.crops
    samples = [
        {
            "global_crops": [torch.randn(3, c.global_crops_size, c.global_crops_size, generator=generator)] * 2,
            "local_crops": [torch.randn(3, c.local_crops_size, c.local_crops_size, generator=generator)]
            * c.local_crops_number,
        }
        for _ in range(cfg.train.batch_size_per_gpu)
    ]
    return MultiCropCollate(c.global_crops_size // cfg.model.patch_size, (0.1, 0.5), mask_probability=0.0)(samples)


def main() -> int:
    args = parse_args()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {"both": list(args.students), **{s: [s] for s in args.students}}
    engines, configs = {}, {}
    for name, students in runs.items():
        cfg = configs[name] = bench_config(args, students)
        plan = bench_plan(cfg)
        torch.manual_seed(0)
        engines[name] = TrainEngine(DistillMetaArch(plan), EngineSettings.from_plan(plan, cfg.train))
    any_engine = engines["both"]
    batch = any_engine.to_device(random_batch(configs["both"], torch.Generator().manual_seed(0)))
    values = any_engine.module.plan.schedules().at(0)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in [*runs, "teacher"]}
    teacher = engines["both"].module
    for step in range(args.warmup + args.steps):
        for name, engine in engines.items():
            t = timed(lambda engine=engine: engine.train_step([batch], values))
            if step >= args.warmup:
                times[name].append(t)
        t = timed(lambda: teacher.teacher_pass(batch["collated_global_crops"], 2, values["teacher_temp"]))
        if step >= args.warmup:
            times["teacher"].append(t)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    two = median["both"]
    singles = {s: median[s] for s in args.students}
    print(
        json.dumps(
            {
                "two_students_s": round(two, 4),
                "two_single_runs_s": round(sum(singles.values()), 4),
                "ratio": round(two / sum(singles.values()), 4),
                "single_run_s": {s: round(v, 4) for s, v in singles.items()},
                "teacher_forward_s": round(median["teacher"], 4),
                "teacher": args.teacher,
                "students": list(args.students),
                "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "precision": any_engine.settings.precision,
                "threads": torch.get_num_threads(),
                "batch_per_gpu": args.batch_per_gpu,
                "global_crops": [2, args.global_size],
                "local_crops": [args.local_crops, args.local_size],
                "prototypes": args.prototypes,
                "steps": args.steps,
                "load_average": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
