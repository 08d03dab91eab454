"""Every pipeline stage once on a GPU at a small preset, so that each `--device cuda` path runs at least once.

    python benchmarks/gpu_stages.py WORK_DIR        # one JSON line per stage: {"stage", "rc", "seconds", "tail"}

The stages run one after the other through `python -m components <stage>` in WORK_DIR with the CLI's default paths,
on params.yaml with a vit_small preset, 112 px crops, bf16, one rank and a few steps each (`OVERRIDES`), tracking off
(no MLflow server, Prefect or DVC needed: the stages' own code paths only). A stage that fails is reported with the
end of its log and the next ones still run (they then fail on its missing outputs, which the lines show).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.cli import STAGES  # noqa: E402
from components.config import apply_overrides, read_params, save_resolved, validate_config  # noqa: E402

OVERRIDES = {
    "model.arch": "vit_small",
    "crops.global_crops_size": 112,
    "crops.local_crops_size": 56,
    "optim.epochs": 2,
    "optim.epoch_length": 4,
    "train.device": "cuda",
    "train.precision": "bf16",
    "train.batch_size_per_gpu": 16,
    "train.num_workers": 4,
    "highres.iterations": 4,
    "highres.warmup_iterations": 1,
    "highres.global_crops_size": 224,
    "highres.batch_size_per_gpu": 4,
    "distill.students": ["vit_small"],
    "distill.epochs": 2,
    "distill.head_fit_iterations": 4,
    "embed.device": "cuda",
    "embed.arch": "vit_small",
    "evaluate.device": "cuda",
    "evaluate.image_size": 112,
    "evaluate.dense_image_size": 112,
}


def main() -> int:
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    params = save_resolved(validate_config(apply_overrides(read_params(ROOT / "params.yaml"), OVERRIDES)),
                           work / "params.yaml")  # fmt: skip
    env = {
        **os.environ,
        "DINOV2_TRACKING": "off",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    for name, spec in STAGES.items():
        paths = [arg for a in spec.paths if a.default for arg in (f"--{a.name}", a.default)]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "components", name, "--params", str(params), *paths], cwd=work,
                              env=env, capture_output=True, text=True, timeout=400, check=False)  # fmt: skip
        line = {"stage": name, "rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
        if proc.returncode:
            line["tail"] = (proc.stdout + proc.stderr)[-1500:]
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
