"""The step-metrics curve (a CSV, the stage's DVC plot), written as a run goes, not at its end.

One row per logged step that the run keeps (its history: `step` and the logged metrics). A row with the columns the
file already has is appended (a line, flushed); a row bringing a new column (a monitor's first value) rewrites the
file, written aside and renamed. A resumed run starts the file again from the history its checkpoint holds, so the
file always equals `pd.DataFrame(history).to_csv(index=False)`: a crash or a tracking outage loses no logged step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components import storage


class CurveFile:
    """The curve CSV of one phase.

    Args:
        path: the CSV file (its folder is created).
        history: the run's rows so far (the trainer's list, which the loop appends to before `append`).
    """

    def __init__(self, path: str | Path, history: Sequence[Mapping[str, Any]]) -> None:
        self.path = Path(path)
        self.history = history
        self.columns: list[str] = []

    def rewrite(self) -> Path:
        """Writes the whole history (aside, then renamed)."""
        import pandas as pd

        frame = pd.DataFrame(list(self.history))
        with storage.atomic_path(self.path) as tmp:
            frame.to_csv(tmp, index=False)
        self.columns = [str(c) for c in frame.columns]
        return self.path

    def append(self, row: Mapping[str, Any]) -> None:
        """Adds the history's newest row: one line, or a rewrite when it brings a new column."""
        import pandas as pd

        if not self.columns or any(k not in self.columns for k in row) or not self.path.is_file():
            self.rewrite()
            return
        line = pd.DataFrame([dict(row)], columns=self.columns).to_csv(header=False, index=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
