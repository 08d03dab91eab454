"""The synthetic world: deterministic from its seed, and its ground truth matches the files on disk."""

from __future__ import annotations

import filecmp
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from components.config import SyntheticConfig
from components.synthetic import (
    DEPTH_SCALE,
    DEPTH_WALL_M,
    DISTANCE_SCALES,
    HUGE_SIDE,
    SEED_SET,
    _depth_scene,
    _multi_scene,
    dense_split_sizes,
    object_classes,
    render_scene,
    render_world,
)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _same_tree(a: Path, b: Path) -> bool:
    files = _tree(a)
    if files != _tree(b):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    return not mismatch and not errors


def test_classes_are_distinct_triples() -> None:
    classes = object_classes(64)
    assert len({(c.shape, c.texture, c.colour) for c in classes}) == 64
    assert len({c.name for c in classes}) == 64
    # Neighbouring classes differ in every attribute, so no single cue is enough for a small K.
    for a, b in zip(classes[:7], classes[1:8], strict=True):
        assert a.shape != b.shape and a.texture != b.texture and a.colour != b.colour
    with pytest.raises(ValueError, match="num_classes"):
        object_classes(65)


def test_same_seed_gives_byte_identical_files(tiny_world: tuple[Path, dict], tmp_path: Path) -> None:
    root, truth = tiny_world
    cfg, seed = SyntheticConfig(**truth["synthetic"]), truth["seed"]
    again = render_world(cfg, seed, tmp_path / "again", num_workers=2)  # another worker count too
    assert again == truth
    assert _same_tree(root, tmp_path / "again")
    other = render_world(cfg, seed + 1, tmp_path / "other", num_workers=0)
    assert other["pool"] != truth["pool"]
    pool_image = sorted(truth["classification"]["train"])[0]
    assert (root / pool_image).read_bytes() != (tmp_path / "other" / pool_image).read_bytes()


def test_ground_truth_matches_the_files(tiny_world: tuple[Path, dict[str, Any]]) -> None:
    root, truth = tiny_world
    cfg = SyntheticConfig(**truth["synthetic"])
    assert json.loads((root / "ground_truth.json").read_text()) == truth
    counts = truth["counts"]
    assert counts["classification"] == len(_tree(root / "eval/classification"))
    assert counts["seeds"] == len(_tree(root / "seeds"))
    assert counts["retrieval"] == len(_tree(root / "eval/retrieval"))
    for task in ("segmentation", "depth"):
        assert counts[task] == len([f for f in _tree(root / "eval" / task) if "/images/" in f])
    planted = ("pool", "near_duplicates", "leaks", "bad_files")
    assert sum(counts[part] for part in planted) == len(_tree(root / "pool"))
    names = [c["name"] for c in truth["classes"]]
    assert len(names) == cfg.num_classes

    for split, per_class in (
        ("train", cfg.eval_train_per_class),
        ("val", cfg.eval_val_per_class),
        ("test", cfg.eval_test_per_class),
    ):
        images = truth["classification"][split]
        assert len(images) == per_class * cfg.num_classes
        for rel, label in images.items():
            assert rel.startswith(f"eval/classification/{split}/{label}/") and (root / rel).is_file()
    seeds = truth["seed_sets"][SEED_SET]
    assert len(seeds) == cfg.seed_per_class * cfg.num_classes
    assert all(rel.startswith(f"seeds/{SEED_SET}/{label}/") for rel, label in seeds.items())

    for task, target in (("segmentation", "masks"), ("depth", "depth")):
        for split, count in dense_split_sizes(cfg).items():
            ids = truth[task]["splits"][split]
            assert len(ids) == count
            for ident in ids:
                image = Image.open(root / f"eval/{task}/{split}/images/{ident}.png")
                target_img = Image.open(root / f"eval/{task}/{split}/{target}/{ident}.png")
                assert image.size == target_img.size == (cfg.image_size, cfg.image_size)
                values = np.asarray(target_img)
                if task == "segmentation":
                    assert target_img.mode == "L" and values.max() <= cfg.num_classes and values.max() > 0
                else:
                    assert target_img.mode == "I;16" and values.min() > 0  # no invalid pixels in this world
    assert json.loads((root / "eval/depth/meta.json").read_text())["depth_scale"] == DEPTH_SCALE
    assert truth["segmentation"]["mask_values"]["0"] == "background"

    places = truth["retrieval"]["places"]
    assert len(places) == cfg.num_places
    for place, views in places.items():
        assert len(views["query"]) == 1 and len(views["database"]) == cfg.views_per_place - 1
        assert all(f"/{place}/" in rel and (root / rel).is_file() for rel in views["query"] + views["database"])

    # Every pool file is accounted for: rendered, planted copy, planted leak or planted bad file.
    pool = set(truth["pool"]["images"])
    assert len(pool) == cfg.pool_size
    copies = [c["path"] for g in truth["near_duplicates"] for c in g["copies"]]
    leaks = [leak["path"] for leak in truth["leaks"]]
    bad = [b["path"] for b in truth["bad_files"]]
    on_disk = {f"pool/{p}" for p in _tree(root / "pool")}
    assert on_disk == pool | set(copies) | set(leaks) | set(bad)
    assert len(on_disk) == len(pool) + len(copies) + len(leaks) + len(bad)
    # Pool files sit in nested sub-folders.
    assert max(rel.count("/") for rel in pool) >= 3

    assert len(truth["near_duplicates"]) == round(cfg.duplicate_fraction * cfg.pool_size)
    assert all(g["original"] in pool for g in truth["near_duplicates"])
    kinds = {c["kind"] for g in truth["near_duplicates"] for c in g["copies"]}
    assert "exact" in kinds and kinds <= {"exact", "crop", "reencode", "colour", "resize"}
    exact = truth["near_duplicates"][0]
    assert (root / exact["copies"][0]["path"]).read_bytes() == (root / exact["original"]).read_bytes()

    assert len(leaks) == cfg.leak_per_class * cfg.num_classes
    assert all(leak["eval_path"] in truth["classification"]["test"] for leak in truth["leaks"])
    first = truth["leaks"][0]
    assert first["kind"] == "exact" and (root / first["path"]).read_bytes() == (root / first["eval_path"]).read_bytes()

    reasons = {Path(b["path"]).name: b["reason"] for b in truth["bad_files"]}
    assert reasons == {
        "truncated.jpg": "truncated",
        "empty.jpg": "empty",
        "notes.jpg": "not_an_image",
        "tiny.png": "too_small",
        "huge_header.png": "too_large",
        "readme.txt": "not_an_image",  # every file is decoded: a text file is no image whatever it is called
    }
    assert (root / "pool/incoming/empty.jpg").stat().st_size == 0
    assert (root / "pool/incoming/huge_header.png").stat().st_size < 200  # claims 1e10 pixels in a few bytes
    with pytest.raises(Image.DecompressionBombError):
        Image.open(root / "pool/incoming/huge_header.png")
    assert HUGE_SIDE**2 > 10**9


def test_mask_and_depth_agree_with_the_scene() -> None:
    classes = object_classes(4)
    rng = np.random.default_rng(0)
    for _ in range(5):
        scene = _multi_scene(rng, classes, (2, 4))
        _, mask, depth = render_scene(scene, classes, 64, rng)
        objects = mask > 0
        assert objects.any() and (~objects).any()
        # Objects stand nearer the camera than the ground plane behind them.
        plane = scene.depth_far + (scene.depth_near - scene.depth_far) * np.clip(
            (np.arange(64)[:, None] + 0.5) / 64 + scene.depth_tilt * ((np.arange(64)[None, :] + 0.5) / 64 - 0.5), 0, 1
        )
        assert np.all(depth[objects] < plane[objects])
        assert np.allclose(depth[~objects], plane[~objects], atol=1e-4)
        assert set(np.unique(mask[objects]) - 1) <= {o.cls for o in scene.objects}


def test_class_distances_spread_evenly_in_a_fixed_order() -> None:
    lo, hi = DISTANCE_SCALES
    for k in (1, 2, 8):
        distances = [c.distance for c in object_classes(k)]
        assert distances == [c.distance for c in object_classes(k)]  # the same on every call
        expected = np.linspace(lo, hi, k) if k > 1 else [lo]
        assert np.allclose(sorted(distances), expected)
    assert [c.distance for c in object_classes(8)] != sorted(c.distance for c in object_classes(8))  # not by index


def test_depth_scenes_follow_their_class_distance() -> None:
    """A depth scene shows one kind of object in front of a wall; the wall stands at 8 m times the class's distance
    scale (up to 10% either way), the objects nearer, and the rendered map holds exactly that."""
    classes = object_classes(8)
    rng = np.random.default_rng(0)
    walls: dict[int, list[float]] = {}
    for _ in range(40):
        scene = _depth_scene(rng, classes)
        main = max(scene.objects, key=lambda o: o.radius)  # the dominant object; a distractor is smaller
        scale = scene.depth_far / DEPTH_WALL_M
        assert scene.depth_near == scene.depth_far and scene.depth_tilt == 0.0
        assert 0.9 * classes[main.cls].distance <= scale <= 1.1 * classes[main.cls].distance
        assert all(1.0 * scale <= o.depth_m <= 3.0 * scale for o in scene.objects)
        _, mask, depth = render_scene(scene, classes, 48, rng)
        assert np.allclose(depth[mask == 0], scene.depth_far)
        assert (mask > 0).any() and np.all(depth[mask > 0] < scene.depth_far)
        walls.setdefault(main.cls, []).append(scene.depth_far)
    # Nearest and farthest class: their walls never overlap (scales 0.5 and 2 stay apart by more than 10% each).
    near = min(walls, key=lambda k: classes[k].distance)
    far = max(walls, key=lambda k: classes[k].distance)
    assert max(walls[near]) < min(walls[far])


def test_render_replaces_a_world_but_not_a_user_folder(tmp_path: Path) -> None:
    cfg = SyntheticConfig(num_classes=2, image_size=32, pool_size=4, seed_per_class=1, eval_train_per_class=1,
                          eval_val_per_class=1, eval_test_per_class=1, num_places=2, views_per_place=2,
                          leak_per_class=0, duplicate_fraction=0.0, bad_files=False)  # fmt: skip
    world = tmp_path / "world"
    render_world(cfg, 0, world, num_workers=0)
    (world / "pool" / "stale.jpg").write_bytes(b"left over")
    render_world(cfg, 0, world, num_workers=0)
    assert not (world / "pool" / "stale.jpg").exists()
    assert not list(tmp_path.glob(".world.partial-*"))
    staged = tmp_path / "staged"  # a stage's output folder that already holds its resolved config
    staged.mkdir()
    (staged / "config.yaml").write_text("seed: 0\n")
    render_world(cfg, 0, staged, num_workers=0)
    assert (staged / "config.yaml").is_file() and _tree(staged) == sorted([*_tree(world), "config.yaml"])
    user = tmp_path / "photos"
    (user / "pool").mkdir(parents=True)
    (user / "pool" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="photos"):
        render_world(cfg, 0, user, num_workers=0)
    assert (user / "pool" / "holiday.jpg").read_bytes() == b"precious"


@pytest.mark.slow
def test_default_world_renders_fast(tmp_path: Path) -> None:
    start = time.monotonic()
    truth = render_world(SyntheticConfig(), 0, tmp_path / "world", num_workers=2)
    elapsed = time.monotonic() - start
    assert len(truth["pool"]["images"]) == SyntheticConfig().pool_size
    assert elapsed < 20, f"default world took {elapsed:.1f} s"
