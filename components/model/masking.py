"""Block-wise masking for iBOT, as in BEiT (Bao et al. 2022) and the DINOv2 release.

Masks are drawn as a union of rectangles of at least 4 patches with aspect ratios in [0.3, 1 / 0.3], until the
requested number of patches is covered or no rectangle can add any.
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor


class MaskingGenerator:
    """Draws block-wise boolean masks over an (H, W) patch grid.

    Args:
        input_size: the patch grid (H, W), or its side for a square grid (16 for 224 px and patch 14).
        max_num_patches: the largest rectangle, in patches (DINOv2: half the grid).
        min_num_patches: the smallest rectangle, in patches (4).
        min_aspect: the smallest rectangle aspect ratio (0.3); the largest is `max_aspect` or 1 / `min_aspect`.
        max_aspect: see `min_aspect`.
        rng: source of randomness; None uses the `random` module, which PyTorch reseeds in each DataLoader worker
            (a shared `random.Random` would give every worker the same masks).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator(grid={self.height}x{self.width}, blocks={self.min_num_patches}.."
            f"{self.max_num_patches} patches, log_aspect={self.log_aspect_ratio})"
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: Tensor, max_mask_patches: float) -> int:
        """Tries (10 times) to add one rectangle that masks between 1 and `max_mask_patches` new patches."""
        rnd = self.rng or random
        for _ in range(10):
            target_area = rnd.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rnd.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rnd.randint(0, self.height - h)
                left = rnd.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]  # a view
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:  # overlap allowed, but the block must add something
                    block.fill_(True)
                    return new
        return 0

    def __call__(self, num_masking_patches: int = 0) -> Tensor:
        """A boolean (H, W) mask with at most `num_masking_patches` patches set (often exactly that many)."""
        mask = torch.zeros(self.shape, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches))
            if added == 0:
                break
            count += added
        return mask
