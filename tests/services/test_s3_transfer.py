"""Checkpoint-sized transfers against a real SeaweedFS: multipart, retries through a restart, verified checksums.

.venv/bin/python -m pytest tests/services/test_s3_transfer.py
"""

from __future__ import annotations

import filecmp
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components import storage
from components.storage import InvalidURIError, StorageError, TransferConfig
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

MiB = 1024 * 1024
# Small parts so that a few MiB make a real multipart upload (S3's minimum part size is 5 MiB).
SMALL_PARTS = TransferConfig(part_size=5 * MiB, multipart_threshold=5 * MiB, max_concurrency=3)


def _random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


# --------------------------------------------------------------------------------------------------------------------
# Keys (no server)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/../other/key",
        "s3://bucket/a/../../b",
        "s3://bucket/a/./b",
        "s3://bucket//absolute",
        "s3://bucket/a//b",
        "s3://bucket/a\x00b",
        "s3://bucket/a\nb",
        "s3://bu/cket/" + "k" * 1025,
        "s3://../key",
        "s3://bucket name/key",
    ],
)
def test_unsafe_s3_uris_are_refused(uri: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidURIError):
        storage.split_s3(uri)
    # Every operation goes through the same check, before any request.
    src = _random_file(tmp_path / "x.bin", 10)
    with pytest.raises(InvalidURIError):
        storage.upload_file(src, uri)
    with pytest.raises(InvalidURIError):
        storage.download_file(uri, tmp_path / "y.bin")
    with pytest.raises(InvalidURIError):
        storage.write_bytes(uri, b"x")


def test_safe_s3_uris_are_accepted() -> None:
    assert storage.split_s3("s3://bucket/models/vit_small/teacher.pth") == ("bucket", "models/vit_small/teacher.pth")
    assert storage.split_s3("s3://bucket/prefix/") == ("bucket", "prefix/")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    assert storage.split_s3("s3://bucket/a..b/c.d") == ("bucket", "a..b/c.d")  # dots inside a name are fine


def test_upload_needs_an_object_key(tmp_path: Path) -> None:
    src = _random_file(tmp_path / "x.bin", 10)
    for uri in ("s3://bucket", "s3://bucket/prefix/"):
        with pytest.raises(InvalidURIError, match="object key"):
            storage.upload_file(src, uri)


def test_local_upload_and_download_are_atomic_copies(tmp_path: Path) -> None:
    src = _random_file(tmp_path / "ckpt.pth", 3 * MiB)
    sha = storage.upload_file(src, str(tmp_path / "out" / "ckpt.pth"))
    assert sha == storage.sha256_file(src)
    assert storage.download_file(str(tmp_path / "out" / "ckpt.pth"), tmp_path / "back.pth") == sha
    assert filecmp.cmp(src, tmp_path / "back.pth", shallow=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ckpt.pth"]  # no temporary file left


# --------------------------------------------------------------------------------------------------------------------
# Against the session's SeaweedFS
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.services
def test_multipart_round_trip_records_and_verifies_sha256(s3_bucket: str, tmp_path: Path) -> None:
    src = _random_file(tmp_path / "teacher.pth", 12 * MiB + 123)  # three parts, the last one short
    uri = f"s3://{s3_bucket}/models/teacher.pth"
    progress: list[int] = []
    lock = threading.Lock()

    def count(num_bytes: int) -> None:
        with lock:
            progress.append(num_bytes)

    sha = storage.upload_file(src, uri, config=SMALL_PARTS, callback=count)
    assert sha == storage.sha256_file(src)
    assert sum(progress) == src.stat().st_size and len(progress) == 3
    head = storage.s3_client().head_object(Bucket=s3_bucket, Key="models/teacher.pth")
    assert head["Metadata"][storage.SHA256_METADATA] == sha
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object of three parts

    out = tmp_path / "down" / "teacher.pth"
    assert storage.download_file(uri, out, config=SMALL_PARTS, require_checksum=True) == sha
    assert filecmp.cmp(src, out, shallow=False)

    small = _random_file(tmp_path / "small.bin", 1000)  # one PUT, same guarantees
    small_sha = storage.upload_file(small, f"s3://{s3_bucket}/small.bin")
    assert storage.download_file(f"s3://{s3_bucket}/small.bin", tmp_path / "small.out") == small_sha


@pytest.mark.services
def test_download_refuses_a_corrupted_object(s3_bucket: str, tmp_path: Path) -> None:
    src = _random_file(tmp_path / "model.pth", 2 * MiB)
    uri = f"s3://{s3_bucket}/model.pth"
    sha = storage.upload_file(src, uri)
    # Same size, same recorded checksum, one byte different: what bit rot or a tampered copy looks like.
    data = bytearray(src.read_bytes())
    data[12345] ^= 0xFF
    storage.s3_client().put_object(
        Bucket=s3_bucket, Key="model.pth", Body=bytes(data), Metadata={storage.SHA256_METADATA: sha}
    )
    target = tmp_path / "down" / "model.pth"
    with pytest.raises(StorageError, match="checksum mismatch"):
        storage.download_file(uri, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary file left behind

    storage.s3_client().put_object(Bucket=s3_bucket, Key="foreign.bin", Body=b"no checksum recorded")
    with pytest.raises(StorageError, match="no sha256 recorded"):
        storage.download_file(f"s3://{s3_bucket}/foreign.bin", tmp_path / "f.bin", require_checksum=True)
    storage.download_file(f"s3://{s3_bucket}/foreign.bin", tmp_path / "f.bin")  # size-checked only
    assert (tmp_path / "f.bin").read_bytes() == b"no checksum recorded"


# --------------------------------------------------------------------------------------------------------------------
# Through an S3 server restart (a server of its own: restarting the session's would disturb other tests)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def restartable_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from infra.services import Ports, S3Credentials, SeaweedFS

    server = SeaweedFS(
        tmp_path_factory.mktemp("restartable-s3"),
        ports=Ports.free(),
        credentials=S3Credentials(S3_ACCESS_KEY, S3_SECRET_KEY),
        buckets=("checkpoints",),
        volume_size_limit_mb=64,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def restartable_env(restartable_s3: Any, s3_env: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AWS_ENDPOINT_URL", restartable_s3.endpoint)
    return restartable_s3


class _Retries(logging.Handler):
    """Collects the storage module's retry warnings (the `dinov2` loggers do not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def retries() -> Iterator[_Retries]:
    handler = _Retries()
    logger = logging.getLogger("dinov2.storage")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.mark.services
def test_upload_survives_an_s3_restart_mid_transfer(restartable_env: Any, retries: _Retries, tmp_path: Path) -> None:
    server = restartable_env
    src = _random_file(tmp_path / "checkpoint.pth", 40 * MiB)  # 8 parts of 5 MiB, 2 in flight
    uri = "s3://checkpoints/pretrain/step_100/checkpoint.pth"
    config = TransferConfig(part_size=5 * MiB, multipart_threshold=5 * MiB, max_concurrency=2)
    client = server.client()
    seen: dict[str, Any] = {"bytes": 0, "restarted": False}
    lock = threading.Lock()

    def restart_once(num_bytes: int) -> None:
        # Runs in an upload thread: the upload cannot complete while this callback holds its part.
        with lock:
            seen["bytes"] += num_bytes
            if seen["restarted"] or seen["bytes"] < src.stat().st_size // 4:
                return
            seen["restarted"] = True
            pid_before = server.process.pid()
            server.restart()  # SIGKILL after a short wait: the other part in flight fails and is retried
            seen["new_pid"] = server.process.pid() != pid_before
            uploads = client.list_multipart_uploads(Bucket="checkpoints").get("Uploads", [])
            seen["upload_pending"] = [u["Key"] for u in uploads]
            try:
                client.head_object(Bucket="checkpoints", Key="pretrain/step_100/checkpoint.pth")
                seen["visible_mid_transfer"] = True
            except client.exceptions.ClientError:
                seen["visible_mid_transfer"] = False

    sha = storage.upload_file(src, uri, config=config, callback=restart_once)
    assert seen["restarted"] and seen["new_pid"]
    assert any("try 2 of" in m for m in retries.messages), retries.messages  # the part in flight was retried
    assert seen["upload_pending"] == ["pretrain/step_100/checkpoint.pth"]  # the upload outlived the restart
    assert seen["visible_mid_transfer"] is False  # no partial object under the final key
    out = tmp_path / "back.pth"
    assert storage.download_file(uri, out, config=config, require_checksum=True) == sha
    assert filecmp.cmp(src, out, shallow=False)
    assert client.list_multipart_uploads(Bucket="checkpoints").get("Uploads", []) == []


@pytest.mark.services
def test_upload_to_a_dead_server_fails_and_leaves_no_object(restartable_env: Any, tmp_path: Path) -> None:
    server = restartable_env
    src = _random_file(tmp_path / "checkpoint.pth", 20 * MiB)
    uri = "s3://checkpoints/dead/checkpoint.pth"
    config = TransferConfig(
        part_size=5 * MiB, multipart_threshold=5 * MiB, max_concurrency=1, max_attempts=2, backoff_base_s=0.1
    )
    killed = threading.Event()

    def kill_once(num_bytes: int) -> None:
        if not killed.is_set():
            killed.set()
            server.stop(timeout_s=0)

    try:
        with pytest.raises(StorageError, match="after 2 tries"):
            storage.upload_file(src, uri, config=config, callback=kill_once)
    finally:
        server.start()
    assert not storage.exists(uri)


@pytest.mark.services
def test_checkpoint_folder_round_trip(s3_bucket: str, tmp_path: Path) -> None:
    """A training checkpoint or an export is a folder: it goes up and comes back file by file, each verified."""
    ckpt = tmp_path / "step_000010"
    _random_file((ckpt / "shards").mkdir(parents=True) or ckpt / "shards" / "rank0.pt", 6 * MiB)
    _random_file(ckpt / "state.pt", 1000)
    (ckpt / "model.json").write_text('{"weights": "state.pt"}')
    uri = f"s3://{s3_bucket}/checkpoints/step_000010"
    sent = storage.upload_tree(ckpt, uri, config=SMALL_PARTS)
    assert sorted(sent) == ["model.json", "shards/rank0.pt", "state.pt"]
    back = tmp_path / "back"
    assert storage.download_tree(uri, back, config=SMALL_PARTS) == sent
    for rel in sent:
        assert filecmp.cmp(ckpt / rel, back / rel, shallow=False)
