"""A mirror of a run's checkpoints and exports on S3 (or another folder): multi-node training without a shared
filesystem.

With `train.checkpoint_mirror: s3://bucket/prefix`, every checkpoint is copied there once rank 0 has written it
locally (atomically, with the digests of `components.training.checkpoint`), in the same layout as the stage's
checkpoints folder (`components.training.layout`): `<mirror>/<stage>/<phase>/<fingerprint>/step_<N>/`. `state.pt` goes
up first and `meta.json` last, so a checkpoint on the mirror is complete exactly when its `meta.json` (with the
digests) is there; an upload cut short leaves at most a `state.pt` without it, never listed as complete. The mirror
keeps `train.keep_last` checkpoints, as the local folder does. At the end of a phase its export goes to
`<mirror>/<stage>/<phase>/export/` (weights first, `model.json` last): readable from there by every reader of exports.

On a (re)start, before any rank loads anything, rank 0 decides the checkpoint the run resumes from (`resume_point`):
the newest intact one, local or mirrored. A mirrored one newer than every local one is pulled (downloaded beside the
local checkpoints, verified against the digests of its `meta.json`, renamed into place); a local one the mirror lacks
(the copy was cut short) is pushed first, so that every node can get it. Then each node's first process pulls that
checkpoint into its own folder when it is not there intact (`Trainer`), and every rank loads it. So a job restarted
on other machines, with fresh local folders, resumes from the last checkpoint that reached the mirror.

A damaged checkpoint on the mirror (a digest that does not match) is set aside, never deleted: its objects are copied
to `step_<N>.damaged/` (server-side) with a `DAMAGED.txt` saying why, then removed from `step_<N>/`; the next older
one is tried.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from components import exports, storage
from components.log import get_logger
from components.training.checkpoint import META_FILE, STATE_FILE, CheckpointManager
from components.training.layout import DAMAGED_SUFFIX, TMP_PREFIX, parse_step, step_name

log = get_logger(__name__)

CHECKPOINT_FILES = (STATE_FILE, META_FILE)
"""A checkpoint's files in upload order: `meta.json`, with the digests, last."""


class MirroredCheckpointDamagedError(storage.StorageError):
    """A mirrored checkpoint whose download does not match the digests of its `meta.json` (or cannot be read)."""


class CheckpointMirror:
    """The mirrored checkpoints of one configuration under `root` (`<mirror>/<stage>/<phase>/<fingerprint>`).

    Args:
        root: an `s3://` prefix or a folder.
        keep_last: complete checkpoints kept on the mirror after each push.
        transfer: part size, concurrency and retries of the uploads and downloads.
    """

    def __init__(self, root: str, *, keep_last: int, transfer: storage.TransferConfig | None = None) -> None:
        self.root = storage.normalize(root)
        self.keep_last = keep_last
        self.transfer = transfer

    def __repr__(self) -> str:
        return f"CheckpointMirror({self.root!r})"

    def _uri(self, name: str, file: str | None = None) -> str:
        return storage.join(self.root, name, file) if file else storage.join(self.root, name)

    def _listing(self) -> dict[str, set[str]]:
        """{folder name: its file names} under the root (empty when nothing is there yet)."""
        try:
            uris = storage.list_files(self.root)
        except storage.StorageNotFoundError:
            return {}
        folders: dict[str, set[str]] = {}
        base = self.root.rstrip("/")
        for uri in uris:
            rel = uri[len(base) :].lstrip("/") if storage.is_s3(uri) else os.path.relpath(uri, base)
            folder, _, name = rel.replace(os.sep, "/").partition("/")
            if name:
                folders.setdefault(folder, set()).add(name)
        return folders

    def check_reachable(self) -> None:
        """Lists the mirror once (before any step), so that a wrong bucket, endpoint or credentials stop the run at
        its start rather than at its first checkpoint.

        Raises:
            StorageError: the mirror cannot be listed (a prefix with nothing under it yet is fine).
        """
        try:
            storage.list_files(self.root)
        except storage.StorageNotFoundError as err:
            if storage.is_s3(self.root) and "bucket does not exist" in str(err):
                raise
        except storage.StorageError as err:
            raise storage.StorageError(self.root, f"train.checkpoint_mirror cannot be listed: {err}") from err

    def complete(self) -> list[int]:
        """The steps of the complete checkpoints on the mirror (`state.pt` and `meta.json` there), oldest first."""
        return sorted(
            step
            for folder, names in self._listing().items()
            if (step := parse_step(folder)) is not None and set(CHECKPOINT_FILES) <= names
        )

    # -- up ----------------------------------------------------------------------------------------------------------

    def push(self, local: Path) -> str:
        """Copies a complete local checkpoint (`step_<N>/`) to the mirror, `meta.json` last, then prunes the mirror.

        Returns:
            The checkpoint's URI on the mirror.

        Raises:
            StorageError: an upload failed after its retries (the mirror lacks this checkpoint; `meta.json` was not
                written, so no reader takes it for complete).
        """
        target = self._uri(local.name)
        for name in CHECKPOINT_FILES:
            storage.upload_file(local / name, storage.join(target, name), config=self.transfer)
        log.info("checkpoint %s copied to %s", local, target)
        self.prune()
        return target

    def prune(self) -> None:
        """Keeps the newest `keep_last` complete checkpoints; removes the objects of the others, and of folders left
        without `meta.json` by an interrupted copy. Damaged ones set aside are kept."""
        listing = self._listing()
        steps = sorted(s for f, names in listing.items() if (s := parse_step(f)) is not None and META_FILE in names)
        kept = {step_name(s) for s in steps[-self.keep_last :]}
        for folder, names in listing.items():
            if parse_step(folder) is None or folder in kept:
                continue
            for name in sorted(names, key=lambda n: n == META_FILE, reverse=True):  # meta.json first: incomplete
                storage.delete(self._uri(folder, name))

    # -- down --------------------------------------------------------------------------------------------------------

    def pull(self, step: int, manager: CheckpointManager) -> Path:
        """Downloads the mirrored checkpoint of `step` into `manager`'s folder, verified, renamed into place.

        A local folder of that step that does not verify is set aside first (by this process: it is its node's).

        Raises:
            MirroredCheckpointDamagedError: the download does not match the digests of its `meta.json` (nothing is
                placed; the mirror's copy is left for the caller to set aside).
            StorageNotFoundError: the mirror has no such checkpoint.
        """
        name = step_name(step)
        final = manager.root / name
        manager.root.mkdir(parents=True, exist_ok=True)
        tmp = manager.root / f"{TMP_PREFIX}pull-{socket.gethostname()}-{os.getpid()}-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for file in CHECKPOINT_FILES:
                try:
                    storage.download_file(self._uri(name, file), tmp / file, config=self.transfer)
                except storage.StorageNotFoundError:
                    raise
                except storage.StorageError as err:  # a checksum that does not match: the object is damaged
                    raise MirroredCheckpointDamagedError(self._uri(name), f"{file}: {err}") from err
            problem = CheckpointManager.verify(tmp)
            if problem is not None:
                raise MirroredCheckpointDamagedError(self._uri(name), problem)
            if final.exists():
                why = manager.check(final)
                if why is None:  # another node sharing this folder placed it first
                    return final
                manager.set_aside(final, why, move=True)
            try:
                os.replace(tmp, final)
            except OSError:  # another node sharing this folder placed it meanwhile
                if manager.check(final) is not None:
                    raise
            log.info("checkpoint %s pulled from %s", final, self._uri(name))
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def set_aside(self, step: int, why: str) -> str:
        """Moves the mirrored checkpoint of `step` to `step_<N>.damaged/` (`.damaged-2`, ... when taken), with a
        `DAMAGED.txt`: copied first, removed from `step_<N>/` only once copied; never deleted."""
        name, listing = step_name(step), self._listing()
        target, n = f"{name}{DAMAGED_SUFFIX}", 1
        while target in listing:
            n += 1
            target = f"{name}{DAMAGED_SUFFIX}-{n}"
        names = sorted(listing.get(name, ()), key=lambda f: f == META_FILE, reverse=True)  # meta.json first
        for file in names:
            storage.copy(self._uri(name, file), self._uri(target, file))
        storage.write_bytes(self._uri(target, "DAMAGED.txt"), f"{why}\n".encode())
        for file in names:
            storage.delete(self._uri(name, file))
        log.warning("moved the damaged mirrored checkpoint %s to %s (kept, never resumed)", self._uri(name), target)
        return self._uri(target)


def resume_point(manager: CheckpointManager, mirror: CheckpointMirror) -> int | None:
    """Rank 0 at a (re)start: the step the run resumes from, the newest intact checkpoint local or mirrored; None for
    a fresh start.

    A mirrored checkpoint newer than the newest intact local one is pulled (a damaged one is set aside on the mirror
    and the next tried); a local one the mirror lacks is pushed, so that every node can pull it.
    """
    local = manager.newest_intact()
    local_step = parse_step(local.name) if local is not None else None
    mirrored = mirror.complete()
    for step in reversed(mirrored):
        if local_step is not None and step <= local_step:
            break
        try:
            mirror.pull(step, manager)
        except MirroredCheckpointDamagedError as err:
            log.error("mirrored checkpoint of step %d is damaged: %s", step, err)
            mirror.set_aside(step, str(err))
            continue
        return step
    if local is not None and local_step not in mirrored:
        log.info("the mirror lacks %s (its copy was cut short): copying it now", local)
        mirror.push(local)
    return local_step


def push_export(folder: Path, uri: str, *, transfer: storage.TransferConfig | None = None) -> list[str]:
    """Copies every export under `folder` (each `model.json` and the files it names) to `uri`, keeping the relative
    layout; weights first, each descriptor last, so that a reader that finds `model.json` finds its weights complete.

    Returns:
        The descriptors' URIs.
    """
    pushed = []
    for descriptor in sorted(folder.glob(f"**/{exports.DESCRIPTOR}")):
        source = descriptor.parent
        target = storage.join(uri, source.relative_to(folder).as_posix()) if source != folder else uri
        for name in (*exports.BACKBONE_FILES, exports.HEADS_FILE, exports.DESCRIPTOR):
            if (source / name).is_file():
                storage.upload_file(source / name, storage.join(target, name), config=transfer)
        pushed.append(storage.join(target, exports.DESCRIPTOR))
    return pushed


def pull_export(uri: str, folder: Path, *, transfer: storage.TransferConfig | None = None) -> None:
    """Copies the exports under `uri` (as `push_export` left them) into `folder`, each file verified and renamed into
    place, each descriptor last."""
    base = storage.normalize(uri)
    files = sorted(storage.list_files(uri), key=lambda u: (storage.basename(u) == exports.DESCRIPTOR, u))
    for item in files:
        rel = item[len(base) :].lstrip("/") if storage.is_s3(item) else os.path.relpath(item, base)
        storage.validate_key(rel, item)
        storage.download_file(item, folder / rel, config=transfer)
