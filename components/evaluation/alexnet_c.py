"""AlexNet's published ImageNet-C errors: the normaliser of mCE.

Hendrycks, D. and Dietterich, T. (2019). Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations. ICLR 2019. The numbers are AlexNet's top-1 errors on each corruption of ImageNet-C, averaged over the
five severities, as the authors' evaluation code (github.com/hendrycks/robustness, `ImageNet-C/test.py`) and the
evaluation code derived from it (AugMix's `imagenet.py`, mmpretrain's `mCE` metric) state them. CE_c divides a
model's error on corruption c, averaged over the same severities, by this value; mCE is 100 x the mean over the 15
corruptions (`metrics.mean_corruption_error_against_means`). The paper gives no per-severity breakdown, so a run over
fewer than five severities is normalised by the five-severity average (its details say so).
"""

from __future__ import annotations

NAME = "alexnet"
"""`evaluate.robustness_baseline: alexnet` selects this table."""

CITATION = "Hendrycks & Dietterich (2019), Benchmarking Neural Network Robustness to Common Corruptions, ICLR"

MEAN_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
"""Corruption -> AlexNet's top-1 error averaged over severities 1 to 5 (a fraction)."""
