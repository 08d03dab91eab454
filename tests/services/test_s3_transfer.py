"""Checkpoint-sized transfers against a real SeaweedFS: multipart, retries through a restart, S3's own SHA256
checksums and the recorded sha256, verified after download.

.venv/bin/python -m pytest tests/services/test_s3_transfer.py
"""

from __future__ import annotations

import base64
import filecmp
import hashlib
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
    assert sum(progress) == src.stat().st_size
    head = storage.s3_client().head_object(Bucket=s3_bucket, Key="models/teacher.pth", ChecksumMode="ENABLED")
    assert head["Metadata"][storage.SHA256_METADATA] == sha
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object of three parts
    # S3's own checksum of a multipart object: the SHA256 of the parts' SHA256s, which the server checked on receipt
    data = src.read_bytes()
    parts = [hashlib.sha256(data[i : i + 5 * MiB]).digest() for i in range(0, len(data), 5 * MiB)]
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode() + "-3"

    out = tmp_path / "down" / "teacher.pth"
    progress.clear()
    assert storage.download_file(uri, out, config=SMALL_PARTS, callback=count, require_checksum=True) == sha
    assert filecmp.cmp(src, out, shallow=False)
    assert sum(progress) == src.stat().st_size
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher.pth"]  # no temporary file left

    small = _random_file(tmp_path / "small.bin", 1000)  # one PUT, same guarantees
    small_sha = storage.upload_file(small, f"s3://{s3_bucket}/small.bin")
    head = storage.s3_client().head_object(Bucket=s3_bucket, Key="small.bin", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(small_sha)).decode()  # the whole object's
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

    # An object with neither S3's SHA256 (boto3 sends a CRC32 by default) nor a recorded sha256.
    storage.s3_client().put_object(Bucket=s3_bucket, Key="foreign.bin", Body=b"no checksum recorded")
    with pytest.raises(StorageError, match="no sha256 recorded"):
        storage.download_file(f"s3://{s3_bucket}/foreign.bin", tmp_path / "f.bin", require_checksum=True)
    storage.download_file(f"s3://{s3_bucket}/foreign.bin", tmp_path / "f.bin")  # size-checked only
    assert (tmp_path / "f.bin").read_bytes() == b"no checksum recorded"


@pytest.mark.services
def test_s3_sha256_alone_verifies_a_download_and_catches_a_changed_byte(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multipart object written by another tool, with S3's SHA256 checksums but no recorded sha256."""
    src = _random_file(tmp_path / "other.bin", 11 * MiB)
    from boto3.s3.transfer import TransferConfig as Boto3TransferConfig

    storage.s3_client().upload_file(
        str(src),
        s3_bucket,
        "other.bin",
        ExtraArgs={"ChecksumAlgorithm": "SHA256"},
        Config=Boto3TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB),
    )
    head = storage.s3_client().head_object(Bucket=s3_bucket, Key="other.bin", ChecksumMode="ENABLED")
    assert storage.SHA256_METADATA not in head["Metadata"] and head["ChecksumSHA256"].endswith("-3")
    uri = f"s3://{s3_bucket}/other.bin"
    assert storage.download_file(uri, tmp_path / "ok.bin", config=SMALL_PARTS, require_checksum=True) == (
        storage.sha256_file(src)
    )

    digests = storage._file_digests

    def flip_a_byte_then_digest(path: Path, parts: Any) -> Any:  # damage in transit or on the local disk
        with open(path, "r+b") as f:
            f.seek(6 * MiB)
            byte = f.read(1)
            f.seek(6 * MiB)
            f.write(bytes([byte[0] ^ 0xFF]))
        return digests(path, parts)

    monkeypatch.setattr(storage, "_file_digests", flip_a_byte_then_digest)
    target = tmp_path / "bad" / "other.bin"
    with pytest.raises(StorageError, match="checksum mismatch: S3 ChecksumSHA256"):
        storage.download_file(uri, target, config=SMALL_PARTS)
    assert list(target.parent.iterdir()) == []  # nothing renamed into place, no temporary file left


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
    """The server is killed and restarted while a part's request is half sent, whatever the machine's load.

    s3transfer reports progress as the HTTP layer reads a request's body to send it, so the callback below runs inside
    a part's request, after some of its bytes went out and before the rest: the restart lands while that part is in
    flight. One part at a time, so no other request meets the server while it is down; the half-sent part must fail
    and be sent again, and the upload complete with the file's exact bytes.
    """
    server = restartable_env
    src = _random_file(tmp_path / "checkpoint.pth", 30 * MiB)  # 6 parts of 5 MiB
    key = "pretrain/step_100/checkpoint.pth"
    config = TransferConfig(part_size=5 * MiB, multipart_threshold=5 * MiB, max_concurrency=1)
    client = server.client()
    seen: dict[str, Any] = {"bytes": 0, "restarted": False}
    restart_at = 2 * 5 * MiB + 5 * MiB // 2  # the middle of the third part

    def restart_mid_part(num_bytes: int) -> None:
        seen["bytes"] += num_bytes
        if seen["restarted"] or seen["bytes"] < restart_at:
            return
        seen["restarted"] = True
        seen["part_offset"] = seen["bytes"] % (5 * MiB)  # how far into its part the request was
        pid_before = server.process.pid()
        server.restart()  # SIGKILL after a short wait: the connection of the part in flight dies with the server
        seen["new_pid"] = server.process.pid() != pid_before
        seen["upload_pending"] = [
            u["Key"] for u in client.list_multipart_uploads(Bucket="checkpoints").get("Uploads", [])
        ]
        try:
            client.head_object(Bucket="checkpoints", Key=key)
            seen["visible_mid_transfer"] = True
        except client.exceptions.ClientError:
            seen["visible_mid_transfer"] = False

    sha = storage.upload_file(src, f"s3://checkpoints/{key}", config=config, callback=restart_mid_part)
    assert seen["restarted"] and seen["new_pid"]
    assert 0 < seen["part_offset"] < 5 * MiB  # the restart landed inside a part's request
    assert seen["upload_pending"] == [key]  # the upload outlived the restart ...
    assert seen["visible_mid_transfer"] is False  # ... and showed no partial object under its key
    assert any("UploadPart: try 1 of" in m for m in retries.messages), retries.messages  # the part was sent again
    assert seen["bytes"] == src.stat().st_size  # the retried part's bytes counted once
    out = tmp_path / "back.pth"
    assert storage.download_file(f"s3://checkpoints/{key}", out, config=config, require_checksum=True) == sha
    assert filecmp.cmp(src, out, shallow=False)
    assert client.list_multipart_uploads(Bucket="checkpoints").get("Uploads", []) == []


@pytest.mark.services
def test_upload_to_a_dead_server_fails_and_leaves_no_object(restartable_env: Any, tmp_path: Path) -> None:
    server = restartable_env
    src = _random_file(tmp_path / "checkpoint.pth", 20 * MiB)
    uri = "s3://checkpoints/dead/checkpoint.pth"
    config = TransferConfig(part_size=5 * MiB, multipart_threshold=5 * MiB, max_concurrency=1, max_attempts=2)
    killed = threading.Event()

    def kill_once(num_bytes: int) -> None:
        if not killed.is_set():
            killed.set()
            server.stop(timeout_s=0)

    try:
        with pytest.raises(StorageError, match="cannot reach S3"):
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
