"""prepare: each input is a manifest row or a reject with its reason; local, tar and S3 sources; early errors."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import threading
import time
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from components import prepare as prep
from components import storage
from components.config import PrepareConfig
from components.synthetic import hostile_png

CFG = PrepareConfig(num_workers=0)


def _layout_inputs(root: Path) -> set[str]:
    """Every file of a raw layout that is an input (not a target, not meta.json, not a top-level file)."""
    inputs = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).parts
        if not path.is_file() or len(rel) == 1 or rel[-1] == "meta.json":
            continue
        if rel[0] == "eval" and rel[1] in ("segmentation", "depth") and rel[3] != "images":
            continue
        inputs.add(str(path))
    return inputs


def _jpeg(size: tuple[int, int] = (40, 40), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def prepared(tiny_world: tuple[Path, dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    root, _ = tiny_world
    return prep.prepare(raw=str(root), cfg=CFG)


# --------------------------------------------------------------------------------------------------------------------
# The synthetic world's planted files
# --------------------------------------------------------------------------------------------------------------------


def test_planted_bad_files_rejected_with_their_reason(tiny_world: tuple[Path, dict], prepared: tuple) -> None:
    root, truth = tiny_world
    manifest, rejects = prepared
    reasons = dict(zip(rejects["uri"], rejects["reason"], strict=True))
    for bad in truth["bad_files"]:
        assert reasons.get(str(root / bad["path"])) == bad["reason"], bad
    # Exactly the planted bad files and the planted exact copies are rejected; every other file is kept.
    exact_leak = next(leak for leak in truth["leaks"] if leak["kind"] == "exact")
    exact_group = next(g for g in truth["near_duplicates"] if g["copies"][0]["kind"] == "exact")
    pair = {str(root / exact_group["original"]), str(root / exact_group["copies"][0]["path"])}
    duplicates = rejects[rejects["reason"] == "exact_duplicate"]
    assert set(duplicates["uri"]) - pair == {str(root / exact_leak["path"])}
    assert len(set(duplicates["uri"]) & pair) == 1  # whichever of the pair comes second
    detail = duplicates.set_index("uri")["detail"]
    assert detail[str(root / exact_leak["path"])] == f"same bytes as {root / exact_leak['eval_path']}"
    assert len(rejects) == len(truth["bad_files"]) + 2
    assert set(manifest["uri"]) == _layout_inputs(root) - set(rejects["uri"])


def test_inputs_equal_manifest_plus_rejects(tiny_world: tuple[Path, dict], prepared: tuple) -> None:
    root, truth = tiny_world
    manifest, rejects = prepared
    assert len(manifest) + len(rejects) == sum(truth["counts"].values())
    uris = list(manifest["uri"]) + list(rejects["uri"])
    assert len(uris) == len(set(uris)) == len(_layout_inputs(root))
    assert set(uris) == _layout_inputs(root)


def test_manifest_columns_and_labels(tiny_world: tuple[Path, dict], prepared: tuple) -> None:
    root, truth = tiny_world
    manifest, rejects = prepared
    assert tuple(manifest.columns) == prep.MANIFEST_COLUMNS
    assert tuple(rejects.columns) == prep.REJECT_COLUMNS
    assert manifest["width"].dtype == "int64" and manifest["decodable"].all()
    assert manifest["sha256"].is_unique and not manifest.isna().any().any()
    assert (manifest[["width", "height"]] >= CFG.min_side).all().all()
    row = manifest.set_index("uri")
    for rel, label in truth["classification"]["test"].items():
        uri = str(root / rel)
        assert tuple(row.loc[uri, ["source", "split", "label"]]) == ("eval/classification", "test", label)
    seg_id = truth["segmentation"]["splits"]["val"][0]
    assert tuple(row.loc[str(root / f"eval/segmentation/val/images/{seg_id}.png"), ["source", "split", "label"]]) == (
        "eval/segmentation",
        "val",
        seg_id,
    )
    place, views = next(iter(truth["retrieval"]["places"].items()))
    assert tuple(row.loc[str(root / views["database"][0]), ["source", "split", "label"]]) == (
        "eval/retrieval",
        "database",
        place,
    )
    seed_uri, seed_label = next(iter(truth["seed_sets"]["synthetic"].items()))
    assert tuple(row.loc[str(root / seed_uri), ["source", "split", "label"]]) == ("seeds/synthetic", "seed", seed_label)
    pool = manifest[manifest["source"] == "pool"]
    assert (pool["split"] == "pool").all() and (pool["label"] == "").all()
    assert not manifest["uri"].str.contains("/masks/|/depth/depth/").any()  # targets are not inputs


def test_parallel_decoding_gives_the_same_tables(tiny_world: tuple[Path, dict], prepared: tuple) -> None:
    root, _ = tiny_world
    manifest, rejects = prep.prepare(raw=str(root), cfg=CFG, num_workers=2)
    pd.testing.assert_frame_equal(manifest, prepared[0])
    pd.testing.assert_frame_equal(rejects, prepared[1])


def test_write_outputs(tmp_path: Path, prepared: tuple) -> None:
    manifest, rejects = prepared
    out = tmp_path / "prepared"
    prep.write_outputs(manifest, rejects, out)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet"), manifest)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "rejects.parquet"), rejects)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet", "rejects.parquet"]
    counts = prep.summarize(manifest, rejects)
    assert counts["num_inputs"] == counts["num_kept"] + counts["num_rejected"]
    assert counts["rejected.too_large"] == 1


def test_failed_write_leaves_no_complete_looking_output(
    tmp_path: Path, prepared: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, rejects = prepared
    out = tmp_path / "prepared"
    prep.write_outputs(manifest, rejects, out)  # a previous, complete run

    def failing_write(uri: str, data: bytes) -> None:
        raise OSError(f"{uri}: disk full")

    monkeypatch.setattr(storage, "write_bytes", failing_write)
    with pytest.raises(OSError, match="disk full"):
        prep.write_outputs(manifest, rejects, out)
    assert not (out / "manifest.parquet").exists()


# --------------------------------------------------------------------------------------------------------------------
# Single files: hostile headers, truncation, size bounds
# --------------------------------------------------------------------------------------------------------------------


def test_hostile_header_is_rejected_before_decoding() -> None:
    start = time.monotonic()
    # Past PIL's own bomb guard (the guard is caught), and under it (our header check, before any pixel decodes).
    huge = prep.check_image(hostile_png(), min_side=32, max_pixels=10**12)
    assert huge.reason == "too_large" and "decompression-bomb" in huge.detail
    big = prep.check_image(hostile_png(9000, 9000), min_side=32, max_pixels=40_000_000)
    assert (big.reason, big.width, big.height) == ("too_large", 9000, 9000)
    assert time.monotonic() - start < 2


def test_single_file_reasons() -> None:
    good = _jpeg()
    assert prep.check_image(good, min_side=32, max_pixels=10**6).reason == ""
    assert prep.check_image(good[: len(good) // 2], min_side=32, max_pixels=10**6).reason == "truncated"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    png = buf.getvalue()
    assert prep.check_image(png[:-30], min_side=32, max_pixels=10**6).reason in ("truncated", "decode_error")
    corrupt = png[:40] + bytes(len(png) - 40)  # signature and IHDR intact, the chunks after zeroed
    assert prep.check_image(corrupt, min_side=32, max_pixels=10**6).reason == "decode_error"
    assert prep.check_image(_jpeg((20, 200)), min_side=32, max_pixels=10**6).reason == "too_small"
    assert prep.check_image(b"", min_side=32, max_pixels=10**6).reason == "empty"
    assert prep.check_image(b"GIF89a nonsense", min_side=32, max_pixels=10**6).reason == "decode_error"
    assert prep.check_image(b"plain text", min_side=32, max_pixels=10**6).reason == "not_an_image"


# --------------------------------------------------------------------------------------------------------------------
# Sources: tar shards, extra pool, misplaced files
# --------------------------------------------------------------------------------------------------------------------


def _write_shard(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _small_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    (raw / "pool" / "a").mkdir(parents=True)
    (raw / "pool" / "a" / "red.jpg").write_bytes(_jpeg(colour=(250, 0, 0)))
    (raw / "eval" / "classification" / "train" / "dog").mkdir(parents=True)
    (raw / "eval" / "classification" / "train" / "dog" / "d.jpg").write_bytes(_jpeg(colour=(0, 250, 0)))
    (raw / "eval" / "classification" / "train" / "stray.jpg").write_bytes(_jpeg(colour=(0, 0, 250)))
    (raw / "README.md").write_text("top-level files are not inputs")
    return raw


def test_tar_shards_in_pool_and_extra_pool(tmp_path: Path) -> None:
    raw = _small_raw(tmp_path)
    members = {"m/blue.jpg": _jpeg(colour=(0, 0, 240)), "bad.jpg": b"nope", "meta.json": b"{}"}
    _write_shard(raw / "pool" / "shard-0.tar", members)
    extra = _write_shard(tmp_path / "extra-0.tar", {"white.jpg": _jpeg(colour=(255, 255, 255))})
    (tmp_path / "broken.tar").write_bytes(b"\x1f\x8b not a tar at all" * 40)
    extra_dir = tmp_path / "extra_dir"
    extra_dir.mkdir()
    shutil.copy(tmp_path / "broken.tar", extra_dir / "broken.tar")
    (extra_dir / "green.jpg").write_bytes(_jpeg(colour=(0, 250, 0)))  # same bytes as the eval image

    manifest, rejects = prep.prepare(raw=str(raw), extra_pool=[str(extra), str(extra_dir)], cfg=CFG)
    reasons = dict(zip(rejects["uri"], rejects["reason"], strict=True))
    by_name = {storage.basename(u): r for u, r in reasons.items()}
    assert by_name == {
        "stray.jpg": "misplaced",
        "bad.jpg": "not_an_image",
        "meta.json": "not_an_image",
        "broken.tar": "unreadable",
        "green.jpg": "exact_duplicate",
    }
    kept = {storage.basename(u): u for u in manifest["uri"]}
    assert set(kept) == {"red.jpg", "d.jpg", "blue.jpg", "white.jpg"}
    # Member URIs read back without re-scanning their shard, and hash to the manifest's sha256.
    for uri, sha in zip(manifest["uri"], manifest["sha256"], strict=True):
        if storage.is_tar_member(uri):
            assert hashlib.sha256(storage.read_bytes(uri)).hexdigest() == sha
    assert kept["blue.jpg"].startswith(f"{raw / 'pool' / 'shard-0.tar'}::m/blue.jpg@")
    eval_row = manifest.set_index("uri").loc[str(raw / "eval/classification/train/dog/d.jpg")]
    assert (eval_row["source"], eval_row["split"], eval_row["label"]) == ("eval/classification", "train", "dog")
    assert len(manifest) + len(rejects) == 4 + 5


def _frames(colours: list[tuple[int, int, int]], fmt: str, **save: Any) -> bytes:
    frames = [Image.new("RGB", (48, 40), colour) for colour in colours]
    buf = io.BytesIO()
    if len(frames) > 1:
        save = {"save_all": True, "append_images": frames[1:], **save}
    frames[0].save(buf, fmt, **save)
    return buf.getvalue()


def test_every_format_pillow_decodes_is_an_image_and_extensions_narrow(tmp_path: Path) -> None:
    from components.images import decode_rgb

    raw = tmp_path / "raw"
    (raw / "pool").mkdir(parents=True)
    files = {
        "anim.gif": _frames([(250, 0, 0), (0, 250, 0)], "GIF"),  # two frames: the first is the image
        "pages.tiff": _frames([(0, 0, 250), (250, 250, 0)], "TIFF"),
        "icon.ico": _frames([(10, 200, 10)], "ICO", sizes=[(40, 40)]),
        "no_suffix": _jpeg(colour=(120, 10, 200)),  # a crawler's hash-named file
        "deep.png": b"",  # replaced below by a 16-bit grey PNG
        "notes.txt": b"not an image\n",
    }
    buf = io.BytesIO()
    Image.new("I;16", (40, 40), 40_000).save(buf, "PNG")
    files["deep.png"] = buf.getvalue()
    for name, data in files.items():
        (raw / "pool" / name).write_bytes(data)

    manifest, rejects = prep.prepare(raw=str(raw), cfg=CFG)
    kept = {storage.basename(u): u for u in manifest["uri"]}
    assert set(kept) == {"anim.gif", "pages.tiff", "icon.ico", "no_suffix", "deep.png"}
    reasons = dict(zip(rejects["uri"].map(storage.basename), rejects["reason"], strict=True))
    assert reasons == {"notes.txt": "not_an_image"}
    assert decode_rgb(files["anim.gif"]).getpixel((5, 5))[0] > 200  # the first (red) frame
    assert decode_rgb(files["deep.png"]).getpixel((5, 5)) == (156, 156, 156)  # 40000 / 65535 of the 8-bit range

    narrowed = PrepareConfig(num_workers=0, extensions=(".JPG", ".png"))
    assert narrowed.extensions == (".jpg", ".png")
    manifest, rejects = prep.prepare(raw=str(raw), cfg=narrowed)
    assert {storage.basename(u) for u in manifest["uri"]} == {"deep.png"}
    reasons = dict(zip(rejects["uri"].map(storage.basename), rejects["reason"], strict=True))
    assert reasons["anim.gif"] == reasons["no_suffix"] == "excluded_suffix"
    detail = rejects.set_index(rejects["uri"].map(storage.basename)).loc["anim.gif", "detail"]
    assert "'.gif'" in detail and "prepare.extensions" in detail
    with pytest.raises(ValueError, match="leading dot"):
        PrepareConfig(extensions=("jpg",))


def test_a_file_reached_twice_is_one_input(tmp_path: Path) -> None:
    raw = _small_raw(tmp_path)
    manifest, rejects = prep.prepare(raw=str(raw), extra_pool=[str(raw / "pool") + "/"], cfg=CFG)
    assert manifest["uri"].is_unique and len(manifest) == 2 and list(rejects["reason"]) == ["misplaced"]


# --------------------------------------------------------------------------------------------------------------------
# Bad input: missing folders, unreachable buckets
# --------------------------------------------------------------------------------------------------------------------


def test_missing_sources_raise_naming_them(tmp_path: Path) -> None:
    raw = _small_raw(tmp_path)
    with pytest.raises(storage.StorageNotFoundError, match="does-not-exist: no such folder"):
        prep.prepare(raw=str(tmp_path / "does-not-exist"), cfg=CFG)
    with pytest.raises(storage.StorageNotFoundError, match="more-pool: no such folder"):
        prep.prepare(raw=str(raw), extra_pool=[str(tmp_path / "more-pool")], cfg=CFG)
    with pytest.raises(storage.StorageNotFoundError, match="shard-9.tar: no such tar shard"):
        prep.prepare(raw=str(raw), extra_pool=[str(tmp_path / "shard-9.tar")], cfg=CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no input files"):
        prep.prepare(raw=str(tmp_path / "empty"), cfg=CFG)


def test_unreachable_bucket_raises_naming_it(tmp_path: Path, no_s3_env: str) -> None:
    raw = _small_raw(tmp_path)
    with pytest.raises(storage.StorageError, match="s3://unreachable-bucket/raw: cannot reach S3"):
        prep.prepare(raw="s3://unreachable-bucket/raw", cfg=CFG)
    with pytest.raises(storage.StorageError, match="s3://unreachable-bucket/more: cannot reach S3"):
        prep.prepare(raw=str(raw), extra_pool=["s3://unreachable-bucket/more"], cfg=CFG)


# --------------------------------------------------------------------------------------------------------------------
# S3 sources against SeaweedFS
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.services
def test_s3_prefix_and_s3_shard(
    tiny_world: tuple[Path, dict], prepared: tuple, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = tiny_world
    client = storage.s3_client()
    for path in root.rglob("*"):
        if path.is_file():
            client.put_object(Bucket=s3_bucket, Key=f"world/{path.relative_to(root)}", Body=path.read_bytes())
    shard = _write_shard(tmp_path / "s.tar", {"x/cyan.jpg": _jpeg(colour=(0, 240, 240)), "trunc.jpg": _jpeg()[:300]})
    client.put_object(Bucket=s3_bucket, Key="shards/s.tar", Body=shard.read_bytes())
    raw = f"s3://{s3_bucket}/world"

    # Two workers, with another thread alive as under Prefect: the pool then starts from a forkserver, whose
    # children must still get this test's S3 endpoint and credentials, not those of the server's start.
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        forkserver.ensure_running()
    done = threading.Event()
    other = threading.Thread(target=done.wait)
    other.start()
    try:
        manifest, rejects = prep.prepare(raw=raw, extra_pool=[f"s3://{s3_bucket}/shards/s.tar"], cfg=CFG, num_workers=2)
    finally:
        done.set()
        other.join()

    local_manifest, local_rejects = prepared

    def s3_uri(uri: str) -> str:
        return raw + uri[len(str(root)) :]

    assert set(manifest["uri"]) - set(map(s3_uri, local_manifest["uri"])) == {
        f"s3://{s3_bucket}/shards/s.tar::x/cyan.jpg@512:{len(_jpeg(colour=(0, 240, 240)))}"
    }
    assert set(local_manifest["sha256"]) < set(manifest["sha256"])
    shard_rejects = rejects[rejects["uri"].str.contains("shards/s.tar::")]
    assert list(shard_rejects["reason"]) == ["truncated"]
    assert sorted(rejects["reason"]) == sorted([*local_rejects["reason"], "truncated"])
    assert set(rejects["uri"]) - set(shard_rejects["uri"]) == set(map(s3_uri, local_rejects["uri"]))


@pytest.mark.services
def test_s3_missing_bucket_raises_naming_it(s3_env: str) -> None:
    with pytest.raises(storage.StorageNotFoundError, match="s3://no-such-bucket-xyz/raw: bucket does not exist"):
        prep.prepare(raw="s3://no-such-bucket-xyz/raw", cfg=CFG)
