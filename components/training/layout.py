"""Where a training stage keeps its checkpoints: the one place that decides the layout.

    <checkpoints>/                      the stage's `--checkpoints` folder (dvc.yaml keeps it: `persist: true`)
        <phase>/                        pretrain, gram, highres, head_fit, distill (`PhasePlan.phase`)
            curve.csv                   step metrics of a phase that is not the stage's last
            export/                     the export a later phase of the stage continues from (pretrain before gram)
            export-<digest>/            head_fit: the heads fitted on one teacher's frozen backbone
            <fingerprint>/              one configuration (`plan.fingerprint`: the global batch, not its split)
                step_<NNNNNNNN>/        one checkpoint: state.pt, meta.json (`components.training.checkpoint`)
                .tmp-step_<NNNNNNNN>/   a checkpoint being written (renamed into place when complete)
                step_<NNNNNNNN>.damaged/  a damaged checkpoint, set aside (never resumed, never deleted)

The same layout holds under a mirror (`train.checkpoint_mirror`, an `s3://` prefix): the stage's checkpoints
folder is then `<mirror>/<stage>/`, so that one prefix serves every training stage of a pipeline.
Roots are local folders or `s3://` prefixes (`components.storage` URIs); paths come back as `str`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from components import storage

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
DAMAGED_SUFFIX = ".damaged"
CURVE_FILE = "curve.csv"
EXPORT_DIR = "export"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    """`step_<NNNNNNNN>`: the folder of the checkpoint written after `step` steps."""
    if step < 0:
        raise ValueError(f"a checkpoint step is at least 0, got {step}")
    return f"{STEP_PREFIX}{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint folder's name (`step_00000040` -> 40); None for any other name (a `.tmp-` folder,
    a damaged one set aside, a fingerprint folder)."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class CheckpointLayout:
    """The checkpoints of one training stage under `root` (a folder or an `s3://` prefix)."""

    root: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", str(self.root))

    def phase(self, phase: str) -> str:
        """`<root>/<phase>`: every configuration's checkpoints of a phase, its curve and its exports."""
        if not phase or "/" in phase or phase.startswith("."):
            raise ValueError(f"{phase!r} is not a phase name")
        return storage.join(self.root, phase)

    def run(self, phase: str, fingerprint: str) -> str:
        """`<root>/<phase>/<fingerprint>`: the checkpoints of one configuration (a `CheckpointManager`'s root)."""
        if not fingerprint or "/" in fingerprint or fingerprint.startswith("."):
            raise ValueError(f"{fingerprint!r} is not a fingerprint")
        return storage.join(self.phase(phase), fingerprint)

    def step(self, phase: str, fingerprint: str, step: int) -> str:
        """`<root>/<phase>/<fingerprint>/step_<NNNNNNNN>`: one checkpoint."""
        return storage.join(self.run(phase, fingerprint), step_name(step))

    def export(self, phase: str, tag: str | None = None) -> str:
        """`<root>/<phase>/export` (or `export-<tag>`): the export of a phase that a later phase reads."""
        return storage.join(self.phase(phase), f"{EXPORT_DIR}-{tag}" if tag else EXPORT_DIR)

    def curve(self, phase: str) -> str:
        """`<root>/<phase>/curve.csv`: the step metrics of a phase that is not the stage's last."""
        return storage.join(self.phase(phase), CURVE_FILE)


def stage_layout(checkpoints: str | Path) -> CheckpointLayout:
    """The layout of a stage's `--checkpoints` folder."""
    return CheckpointLayout(str(checkpoints))


def mirror_layout(mirror: str, stage: str) -> CheckpointLayout:
    """The layout of a stage's checkpoints under a mirror prefix: `<mirror>/<stage>/...`."""
    return CheckpointLayout(storage.join(mirror, stage))
