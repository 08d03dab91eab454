"""The 15 ImageNet-C corruptions: all available at 5 severities, deterministic, and faithful where checkable."""

from __future__ import annotations

import numpy as np
import pytest

from components.evaluation import corruptions as C


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((40, 48, 3), 128, np.uint8)  # non-square on purpose
    img[10:30, 12:36] = (200, 40, 40)  # an object
    return np.clip(img + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)


def test_fifteen_corruptions_in_the_papers_order() -> None:
    assert len(C.CORRUPTIONS) == 15 and len(set(C.CORRUPTIONS)) == 15
    assert C.CORRUPTIONS[:3] == ("gaussian_noise", "shot_noise", "impulse_noise")


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_every_severity_runs_keeps_shape_and_changes_the_image(image: np.ndarray, name: str) -> None:
    for severity in C.SEVERITIES:
        out = C.corrupt(image, name, severity, np.random.default_rng(1))
        assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).mean() > 0.5  # severity 5 visibly changes every corruption


def test_seeded_batches_are_reproducible_and_per_image(image: np.ndarray) -> None:
    batch = np.stack([image, image])
    a = C.corrupt_images(batch, "gaussian_noise", 3, seed=0)
    b = C.corrupt_images(batch, "gaussian_noise", 3, seed=0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # each image draws its own noise
    assert not np.array_equal(a, C.corrupt_images(batch, "gaussian_noise", 3, seed=1))


def test_noise_grows_with_severity() -> None:
    grey = np.full((32, 32, 3), 128, np.uint8)
    for name in ("gaussian_noise", "shot_noise", "impulse_noise"):
        diffs = [
            np.abs(C.corrupt(grey, name, s, np.random.default_rng(0)).astype(int) - 128).mean() for s in C.SEVERITIES
        ]
        assert diffs == sorted(diffs), name


def test_contrast_matches_the_reference_formula(image: np.ndarray) -> None:
    x = image / 255.0
    mean = x.mean(axis=(0, 1), keepdims=True)
    expected = np.uint8(np.clip((x - mean) * 0.05 + mean, 0, 1) * 255 + 0.5)
    assert np.array_equal(C.corrupt(image, "contrast", 5, np.random.default_rng(0)), expected)


def test_brightness_matches_an_hsv_round_trip(image: np.ndarray) -> None:
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(image / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + 0.3, 0, 1)
    expected = np.clip(hsv_to_rgb(hsv), 0, 1)
    out = C.brightness(image / 255.0, 3, np.random.default_rng(0))
    assert np.allclose(out, expected, atol=1e-9)


def test_pixelate_and_jpeg_are_deterministic(image: np.ndarray) -> None:
    for name in ("pixelate", "jpeg_compression", "contrast", "brightness"):
        a = C.corrupt(image, name, 4, np.random.default_rng(0))
        assert np.array_equal(a, C.corrupt(image, name, 4, np.random.default_rng(99))), name


def test_plasma_fractal_and_frost_bank() -> None:
    fractal = C.plasma_fractal(np.random.default_rng(0), 64, 2.0)
    assert fractal.shape == (64, 64) and fractal.min() == 0.0 and fractal.max() == 1.0
    with pytest.raises(ValueError, match="power of two"):
        C.plasma_fractal(np.random.default_rng(0), 60)
    bank = C._frost_bank()
    assert len(bank) == C.FROST_BANK_SIZE and bank is C._frost_bank()  # built once, from a fixed seed
    assert all(0.3 < photo.mean() < 0.6 for photo in bank)  # about the photographs' brightness
    assert bank[0][..., 2].mean() > bank[0][..., 0].mean()  # bluish


def test_bad_arguments() -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(KeyError, match="unknown corruption"):
        C.corrupt(img, "rain", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(img, "fog", 6, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        C.corrupt(img.astype(np.float32), "fog", 1, np.random.default_rng(0))
