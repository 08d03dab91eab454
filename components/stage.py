"""Moved to `components.stages.shell`; this name remains only for `components/stages/curate.py`, which is being
rewritten on another branch (distributed curation). Import from `components.stages.shell`; once that branch is
merged, its import changes and this module goes."""

from components.stages.shell import StageRun, stage_run

__all__ = ["StageRun", "stage_run"]
