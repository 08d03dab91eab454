"""Training checkpoints: atomic, verified, pruned, rank-independent, and exactly resumable.

A checkpoint is a folder `<root>/step_<NNNNNNNN>/` holding `state.pt` and `meta.json` (the folders around it are
decided in `components.training.layout`). It is written by rank 0 into `<root>/.tmp-step_<N>/` and renamed into
place, so a folder with the final name is always complete (a crash during the write leaves only a `.tmp-` folder,
removed at the next save). `state.pt` holds:

- `model`: the full state dict of the `TrainModule` (student, teacher, heads, loss centres), per parameter name;
- `optimizer`: AdamW's moments per parameter name and its step count (`TrainEngine.full_optimizer_state`);
- `loop`: step, samples seen (the data position), skipped-step and decode-failure counters;
- `rng`: every rank's torch / CUDA / Python / NumPy generator states;
- `fingerprint` and `plan`: the configuration it belongs to.

Because weights and moments are stored per parameter, whole, a checkpoint loads on any number of ranks and any ZeRO
stage (the consolidation route; DeepSpeed's own per-rank files would tie a resume to the world size that saved
them). On the same world size, a resume reproduces the uninterrupted run bit for bit: the data stream is positional,
the schedules are functions of the step, and the generators are restored. With another world size each new rank
takes a seeded generator state.

Verified on load: meta.json records the size and sha256 of `state.pt`, hashed as it is written (no second pass).
A restart checks the newest checkpoint against them and loads it; one that is damaged (truncated by a node lost
mid-write on a filesystem without atomic renames, a bad disk, a file that torch cannot read) is named with the file
and why, moved aside to `step_<N>.damaged` (never deleted, never trusted) and the next older one is tried. When none
is intact the run stops with `CheckpointDamagedError` naming each of them, and nothing is moved.

Out of space: a save that fails for space (or any OS error) removes its partial `.tmp-` folder and raises
`components.storage.OutOfSpaceError` (a `StorageError` for other OS errors) naming the folder, the bytes it needed
and the bytes free, the step, and the newest checkpoint, intact and resumable. With `prune_to_fit`
(`train.prune_to_fit`), this configuration's older checkpoints are removed first, oldest first and never the newest,
until the save fits.

Only checkpoints of the same configuration are resumed: the trainer keeps each configuration's checkpoints in a
folder named after its fingerprint (`plan.fingerprint`: what the phase computes, its global batch but not how the
batch is split over ranks, and the digests of the curated set and of the weights it starts from; run mechanics such
as workers, logging or the checkpoint period are left out).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.jsonio import dumps
from components.log import get_logger, is_main_process
from components.storage import NO_SPACE_ERRNOS, format_bytes, free_bytes, save_torch, sha256_file, write_error
from components.training.layout import DAMAGED_SUFFIX, TMP_PREFIX, parse_step, step_name

log = get_logger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT = 2
"""2: heads with trainable prototype norms (`last_layer.weight_g`, `weight_v`); 1: prototypes of norm 1."""


class CheckpointDamagedError(RuntimeError):
    """No checkpoint of the configuration is intact; the message names each one and what is wrong with it."""


CODE_PARTS = ("config.py", "model", "training", "stages")
"""What `code_digest` covers, relative to the `components` package: the code a training run executes."""


def code_digest() -> str:
    """A short hash of the training code's sources (`CODE_PARTS`), recorded in every checkpoint's meta.json."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for part in CODE_PARTS:
        root = package / part
        for f in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(f"{f.relative_to(package).as_posix()}\n".encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class LoopState:
    """Where a run is: the next step to run and the counters that survive a resume."""

    step: int = 0
    samples_seen: int = 0
    """Stream position reached: the data position a resume starts from."""
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    decode_failures: int = 0
    start_metrics: dict[str, float] = field(default_factory=dict)
    """What the monitors measured before the first step (the starting model's kNN top-1), for an early stop."""


# --------------------------------------------------------------------------------------------------------------------
# Generator states
# --------------------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's generator states, in types that `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def restore_rng(states: list[dict[str, Any]], rank: int, seed: int, step: int) -> None:
    """Restores this rank's saved generators; a rank the checkpoint did not have is seeded from (seed, step, rank)."""
    if rank < len(states):
        set_rng_state(states[rank])
        return
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(mixed)
    random.seed(mixed)
    np.random.seed(mixed)


# --------------------------------------------------------------------------------------------------------------------
# The folder of checkpoints
# --------------------------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves, finds, verifies, loads and prunes the checkpoints of one run configuration under `root`.

    Args:
        root: the checkpoints folder (dvc.yaml keeps it across runs: `persist: true`).
        keep_last: complete checkpoints of this configuration kept after each save.
        fingerprint: the configuration's fingerprint (`plan.fingerprint`).
        code: `code_digest` of the code writing the checkpoints (recorded in meta.json; see `supersede`).
        prune_to_fit: before a save that does not fit, remove older checkpoints of this configuration (oldest first,
            never the newest) until it does; else the save fails, naming the sizes.
    """

    def __init__(
        self, root: str | Path, *, keep_last: int, fingerprint: str, code: str = "", prune_to_fit: bool = False
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.fingerprint = fingerprint
        self.code = code
        self.prune_to_fit = prune_to_fit
        self._superseded: set[Path] = set()
        self._intact: set[Path] = set()
        """Checkpoints this process found intact (`check`)."""

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (any configuration), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            step = parse_step(d.name)
            if step is not None and (d / STATE_FILE).is_file() and (d / META_FILE).is_file():
                found.append((step, d))
        return sorted(found)

    @staticmethod
    def meta(path: Path) -> dict[str, Any]:
        """A checkpoint's meta.json ({} when unreadable)."""
        try:
            return json.loads((path / META_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _mine(self) -> list[Path]:
        return [
            p
            for _, p in self.complete()
            if self.meta(p).get("fingerprint") == self.fingerprint and p not in self._superseded
        ]

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this configuration, or None (not verified: see `load_latest`)."""
        mine = self._mine()
        others = len(self.complete()) - len(mine) - len(self._superseded)
        if others:
            log.warning("%d checkpoint(s) in %s belong to another configuration: not resumed", others, self.root)
        return mine[-1] if mine else None

    def supersede(self) -> None:
        """Sets aside this configuration's checkpoints: `latest` stops returning them and the next save removes them.

        For a run that starts afresh although they match its configuration (they finished it with other code).
        """
        self._superseded |= set(self._mine())

    # -- verification --------------------------------------------------------------------------------------------

    @staticmethod
    def verify(path: Path) -> str | None:
        """Why the checkpoint at `path` cannot be trusted (the file and what is wrong), or None when its files have
        the sizes and sha256 digests recorded when it was written. A checkpoint from before digests were recorded
        has nothing to compare: loading it is its check."""
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError) as err:
            return f"{META_FILE} unreadable ({err})"
        for name, written in (meta.get("files") or {}).items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            size = f.stat().st_size
            if size != written["bytes"]:
                cut = " (truncated)" if size < written["bytes"] else ""
                return f"{name} has {size} bytes, {written['bytes']} when written{cut}"
            digest = sha256_file(f)
            if digest != written["sha256"]:
                return f"{name} has sha256 {digest[:16]}..., {written['sha256'][:16]}... when written (damaged)"
        return None

    def check(self, path: Path) -> str | None:
        """`verify`, remembered: a checkpoint found intact is not hashed again by this process."""
        if path in self._intact:
            return None
        problem = self.verify(path)
        if problem is None:
            self._intact.add(path)
        return problem

    def load_latest(self, *, upto: int | None = None) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact checkpoint of this configuration and its state (None when there is none at all).

        Newer damaged ones are named (file and why) and moved aside to `step_<N>.damaged` (rank 0 moves them; never
        deleted). This configuration's newest checkpoint is the first to be checked, the older ones only when it is
        damaged.

        Args:
            upto: consider only the checkpoints of this step and earlier (the step every rank agreed on).

        Raises:
            CheckpointDamagedError: every checkpoint of this configuration is damaged (each one named; none moved).
        """
        self.latest()  # one line when checkpoints of another configuration are here
        damaged: list[tuple[Path, str]] = []
        for path in reversed(self._mine()):
            if upto is not None and (parse_step(path.name) or 0) > upto:
                continue
            problem = self.check(path)
            if problem is None:
                try:
                    state = self.load(path)
                except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
                    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                    problem = f"{STATE_FILE} unreadable ({reason})"
                else:
                    for bad, why in damaged:
                        self.set_aside(bad, why)
                    if damaged:
                        log.warning("resuming from %s, the newest intact checkpoint", path)
                    return path, state
            log.error("checkpoint %s is damaged: %s", path, problem)
            damaged.append((path, problem))
        if damaged:
            listed = "; ".join(f"{p.name}: {why}" for p, why in damaged)
            raise CheckpointDamagedError(
                f"no intact checkpoint in {self.root} ({listed}); none was moved: move them away (or set "
                "train.resume = false) to train from the start"
            )
        return None

    def newest_intact(self) -> Path | None:
        """The newest checkpoint of this configuration whose files match their digests (not loaded); newer damaged
        ones are set aside as `load_latest` does. None when there is none, or none intact (nothing is moved then)."""
        damaged: list[tuple[Path, str]] = []
        for path in reversed(self._mine()):
            problem = self.check(path)
            if problem is None:
                for bad, why in damaged:
                    self.set_aside(bad, why)
                return path
            log.error("checkpoint %s is damaged: %s", path, problem)
            damaged.append((path, problem))
        return None

    def set_aside(self, path: Path, why: str, *, move: bool | None = None) -> Path:
        """Moves a damaged checkpoint to `step_<N>.damaged` (`.damaged-2`, ... when taken) beside the others.

        Args:
            move: whether this process moves it; None: rank 0 alone (every rank reaches the same verdict on a
                shared folder). A node's own folder is handled by the node's process that found it.
        """
        target = path.with_name(path.name + DAMAGED_SUFFIX)
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{n}")
        if is_main_process() if move is None else move:
            os.replace(path, target)
            (target / "DAMAGED.txt").write_text(f"{why}\n")
            log.warning("moved the damaged checkpoint %s to %s (kept, never resumed)", path, target)
        self._intact.discard(path)
        return target

    # -- writing -------------------------------------------------------------------------------------------------

    def save(self, state: dict[str, Any], step: int, *, plan: Mapping[str, Any] | None = None) -> Path:
        """Writes `state` as the checkpoint of `step` atomically, then prunes (rank 0 only). `plan` (the plan's
        fingerprint items) goes into meta.json, so that a run of another configuration can say what changed.

        Raises:
            OutOfSpaceError: the disk filled up (or a quota): the partial folder is removed, the newest checkpoint
                is intact (the message names the folder, the bytes needed and free, the step and that checkpoint).
            StorageError: another OS error while writing, named the same way.
        """
        final = self.root / step_name(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        needed = state_bytes(state)
        if self.prune_to_fit:
            self._make_room(needed, step)
        try:
            self._write(tmp, state, step, plan)
        except OSError as first:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (first.errno in NO_SPACE_ERRNOS and self.prune_to_fit and self._make_room(needed, step, full=True)):
                raise self._write_error(tmp, first, step, needed) from first
            try:  # older checkpoints made room: once more
                self._write(tmp, state, step, plan)
            except OSError as second:
                shutil.rmtree(tmp, ignore_errors=True)
                raise self._write_error(tmp, second, step, needed) from second
        if final.exists():  # a re-run that reaches the same step again: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._superseded.discard(final)  # the folder now holds this run's checkpoint
        self._intact.add(final)  # hashed as it was written
        _fsync(self.root)
        self.prune()
        return final

    def _write(self, tmp: Path, state: dict[str, Any], step: int, plan: Mapping[str, Any] | None) -> None:
        """state.pt (hashed as it is written) and meta.json with its size and digest, flushed to disk."""
        tmp.mkdir(parents=True)
        size, digest = save_torch({**state, "format": FORMAT, "fingerprint": self.fingerprint}, tmp / STATE_FILE)
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "code": self.code, "step": step}
        meta["files"] = {STATE_FILE: {"bytes": size, "sha256": digest}}
        meta["loop"] = state.get("loop")
        meta["plan"] = dict(plan or {})
        (tmp / META_FILE).write_text(dumps(meta))
        _fsync_dir_files(tmp)

    def _write_error(self, tmp: Path, err: OSError, step: int, needed: int) -> OSError:
        newest = self._mine()
        kept = (
            f"the partial folder is removed and the newest checkpoint, {newest[-1]}, is intact: free space (or set "
            "train.prune_to_fit) and run again to resume from it"
            if newest
            else "the partial folder is removed; there is no earlier checkpoint of this run"
        )
        return write_error(tmp, err, what=f"the checkpoint of step {step}", needed=needed, kept=kept)

    def _make_room(self, needed: int, step: int, *, full: bool = False) -> bool:
        """Removes this configuration's older checkpoints (oldest first, never the newest) until `needed` bytes are
        free (`full`: the write already failed for space, so at least one goes). True if any was removed."""
        removed = False
        for old in self._mine()[:-1]:
            free = free_bytes(self.root)
            if not full and free is not None and free >= needed:
                break
            size = sum(f.stat().st_size for f in old.rglob("*") if f.is_file())
            shutil.rmtree(old)
            removed, full = True, False
            log.warning(
                "removed checkpoint %s (%s) so that the checkpoint of step %d (%s) fits (train.prune_to_fit)",
                old, format_bytes(size), step, format_bytes(needed),
            )  # fmt: skip
        return removed

    def prune(self) -> None:
        """Keeps the newest `keep_last` checkpoints of this configuration; removes the others and stale temp folders
        (damaged checkpoints moved aside are kept)."""
        mine = self._mine()
        doomed = [p for _, p in self.complete() if p not in mine[-self.keep_last :]]
        doomed += [d for d in self.root.iterdir() if d.name.startswith(TMP_PREFIX)]
        for d in doomed:
            shutil.rmtree(d, ignore_errors=True)

    @staticmethod
    def load(path: str | Path) -> dict[str, Any]:
        """Reads a checkpoint's state on the CPU (tensors, numbers and strings only: `weights_only=True`)."""
        state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT:
            raise ValueError(f"{path}: checkpoint format {state.get('format')} is not {FORMAT}")
        return state


def state_bytes(state: Any) -> int:
    """About the bytes `torch.save` writes for `state`: its tensors' storage, plus 64 KiB for everything else."""
    total = 0
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total + 2**16


def loop_state_from(state: dict[str, Any]) -> LoopState:
    return LoopState(**state["loop"])


def loop_state_dict(loop: LoopState) -> dict[str, int]:
    return asdict(loop)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_files(folder: Path) -> None:
    for f in folder.iterdir():
        _fsync(f)
    _fsync(folder)
