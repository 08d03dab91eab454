"""The storage interface: local paths, tar-member URIs, and S3 against a real SeaweedFS server."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest

from components import storage


def _make_tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        info = tarfile.TarInfo("adir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------------------------------


def test_uri_helpers() -> None:
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/data/x")
    assert storage.split_s3("s3://bucket/a/b.jpg") == ("bucket", "a/b.jpg")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_s3("s3:///key")
    assert storage.join("s3://b/p/", "x", "y.jpg") == "s3://b/p/x/y.jpg"
    assert storage.join("data", "x") == "data/x"
    assert storage.normalize("s3://b/p/") == "s3://b/p"
    assert storage.normalize("data/./x/") == "data/x"
    assert storage.suffix("a/B.JPG") == ".jpg"
    assert storage.suffix("a/.hidden") == ""
    assert storage.suffix("s3://b/s.tar::x/y.png@512:10") == ".png"


def test_tar_member_uri_round_trip() -> None:
    for name in ("a.jpg", "dir/with@at.png", "odd::name@1:2.jpg"):
        member = storage.TarMember("s3://b/shards/s-0.tar", name, 1536, 42)
        assert storage.parse_tar_member(member.uri) == member
        assert storage.is_tar_member(member.uri)
        assert not storage.is_tar_shard(member.uri)
    assert storage.parse_tar_member("data/x.jpg") is None
    assert storage.is_tar_shard("data/shard.TAR")


# --------------------------------------------------------------------------------------------------------------------
# Local
# --------------------------------------------------------------------------------------------------------------------


def test_local_list_read_write(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "a" / "b" / "c.bin"), b"abc")
    storage.write_bytes(str(tmp_path / "a" / "top.bin"), b"top")
    root = str(tmp_path / "a")
    assert storage.list_files(root) == [f"{root}/b/c.bin", f"{root}/top.bin"]
    assert storage.list_files(root, recursive=False) == [f"{root}/top.bin"]
    assert storage.read_bytes(f"{root}/b/c.bin") == b"abc"
    assert storage.read_range(f"{root}/b/c.bin", 1, 2) == b"bc"
    assert storage.exists(f"{root}/top.bin") and not storage.exists(f"{root}/nope.bin")
    # No temporary file is left beside the target.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b", "top.bin"]


def test_local_symlinked_folder_is_followed_once(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "real" / "x.bin"), b"x")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "real")  # a cycle must not hang the walk
    assert storage.list_files(str(tmp_path / "root")) == [str(tmp_path / "root" / "link" / "x.bin")]


def test_missing_local_folder_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "such")
    with pytest.raises(storage.StorageNotFoundError, match="no/such: no such folder") as info:
        storage.list_files(missing)
    assert isinstance(info.value, FileNotFoundError) and info.value.uri == missing
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(storage.StorageError, match="not a folder"):
        storage.list_files(str(tmp_path / "file"))
    with pytest.raises(storage.StorageNotFoundError, match="no such file"):
        storage.read_bytes(missing)


def test_write_bytes_is_atomic_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    storage.write_bytes(str(target), b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")  # type: ignore[arg-type]  # fails while writing the temp
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_path_keeps_the_suffix_and_never_leaves_a_partial_target(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "weights.safetensors"
    with storage.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".safetensors" and tmp.name.startswith(".")
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing under the final name until the block ends
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), storage.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"new" and [p.name for p in target.parent.iterdir()] == [target.name]


def test_local_tar_members(tmp_path: Path) -> None:
    members = {"x/a.jpg": b"A" * 700, "b.png": b"", "c@odd.jpg": b"C" * 3}
    shard = str(_make_tar(tmp_path / "s.tar", members))
    listed = storage.list_tar_members(shard)
    assert [m.name for m in listed] == list(members)  # the directory entry is skipped
    for m in listed:
        assert storage.read_bytes(m.uri) == members[m.name]
        assert storage.exists(m.uri)
    with pytest.raises(storage.StorageNotFoundError):
        storage.list_tar_members(str(tmp_path / "missing.tar"))
    gz = str(_make_tar(tmp_path / "z.tar", members, mode="w:gz"))
    with pytest.raises(storage.StorageError, match="uncompressed tar"):
        storage.list_tar_members(gz)
    # A member URI whose range runs past the end of the shard (a truncated shard) is a short read.
    with pytest.raises(storage.StorageError, match="short read"):
        storage.read_bytes(storage.TarMember(shard, "x", 10**6, 10).uri)


# --------------------------------------------------------------------------------------------------------------------
# S3 client configuration and unreachable endpoints (no server needed)
# --------------------------------------------------------------------------------------------------------------------


def test_client_reads_endpoint_and_retries_from_environment(no_s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = storage.s3_client()
    assert client.meta.endpoint_url == no_s3_env  # AWS_ENDPOINT_URL, honoured by boto3 itself
    assert client.meta.config.retries["mode"] == "standard"
    assert client.meta.config.retries["total_max_attempts"] == 1
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert storage.s3_client() is not client  # a changed AWS_* environment gets its own client
    assert storage.s3_client().meta.config.retries["mode"] == "adaptive"


def test_unreachable_endpoint_names_the_uri(no_s3_env: str) -> None:
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"s3://some-bucket/raw: cannot reach S3 at http://127\.0\.0\.1"):
        storage.list_files("s3://some-bucket/raw")
    with pytest.raises(storage.StorageError, match="s3://some-bucket/x.jpg: cannot reach S3"):
        storage.read_bytes("s3://some-bucket/x.jpg")
    assert time.monotonic() - start < 10


# --------------------------------------------------------------------------------------------------------------------
# S3 against SeaweedFS
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.services
def test_s3_round_trip_and_paginated_listing(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base = f"s3://{s3_bucket}/data"
    keys = ["a.bin", "b/c.bin", "b/d/e.bin", "f.bin", "g.bin"]
    for i, key in enumerate(keys):
        storage.write_bytes(f"{base}/{key}", bytes([i]) * (i + 1))
    storage.s3_client().put_object(Bucket=s3_bucket, Key="data/empty-folder/", Body=b"")  # a "folder" marker
    monkeypatch.setattr(storage, "_S3_PAGE_SIZE", 2)  # five objects: three pages
    assert storage.list_files(base) == [f"{base}/{k}" for k in sorted(keys)]
    assert storage.list_files(base + "/", recursive=False) == [f"{base}/{k}" for k in ("a.bin", "f.bin", "g.bin")]
    assert storage.read_bytes(f"{base}/b/d/e.bin") == bytes([2]) * 3
    assert storage.read_range(f"{base}/g.bin", 1, 3) == bytes([4]) * 3
    assert storage.exists(f"{base}/a.bin") and not storage.exists(f"{base}/zzz.bin")
    assert storage.exists(f"s3://{s3_bucket}") and not storage.exists("s3://no-such-bucket-here")


@pytest.mark.services
def test_s3_missing_bucket_and_prefix_name_the_uri(s3_bucket: str) -> None:
    with pytest.raises(storage.StorageNotFoundError, match="s3://no-such-bucket-here/raw: bucket does not exist"):
        storage.list_files("s3://no-such-bucket-here/raw")
    with pytest.raises(storage.StorageNotFoundError, match=f"s3://{s3_bucket}/nothing: no objects under this prefix"):
        storage.list_files(f"s3://{s3_bucket}/nothing")
    with pytest.raises(storage.StorageNotFoundError, match="no such object"):
        storage.read_bytes(f"s3://{s3_bucket}/nothing.jpg")


@pytest.mark.services
def test_s3_tar_members(s3_bucket: str, tmp_path: Path) -> None:
    members = {"a.jpg": b"A" * 1000, "sub/b.png": b"B" * 513}
    shard = f"s3://{s3_bucket}/shards/s-000.tar"
    storage.write_bytes(shard, _make_tar(tmp_path / "s.tar", members).read_bytes())
    listed = storage.list_tar_members(shard)
    # Streamed from S3, the offsets are those of the local file.
    assert [(m.name, m.offset, m.size) for m in listed] == [
        (m.name, m.offset, m.size) for m in storage.list_tar_members(str(tmp_path / "s.tar"))
    ]
    assert {m.name: storage.read_bytes(m.uri) for m in listed} == members


@pytest.mark.services
def test_weights_on_s3_load_through_a_verified_local_copy(s3_bucket: str, tmp_path: Path) -> None:
    import torch

    from components.evaluation.models import ModelSpec, build_model
    from components.model import build_backbone

    source = build_backbone("vit_test")
    local = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), local)
    uri = f"s3://{s3_bucket}/weights/backbone.pth"
    storage.upload_file(str(local), uri)
    with storage.local_copy(uri) as path:
        copy = path
        assert path.read_bytes() == local.read_bytes() and path.name == "backbone.pth"
    assert not copy.exists()  # the temporary copy is removed with its folder
    with storage.local_copy(str(local)) as path:
        assert path == local  # a local file is read in place
    loaded = build_model(ModelSpec(name="m", arch="vit_test", role="teacher", weights=uri), seed=1)
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
