"""DINOv2's multi-crop augmentation (torchvision v2 transforms), the collate function that builds the iBOT masks,
and the evaluation transform.

Crop-major layout throughout: a batch of B images with 2 global and L local crops collates to global crops
(2 B, 3, 224, 224) ordered [crop 0 of every image, crop 1 of every image], and local crops (L B, 3, 98, 98) likewise,
so that `x.view(2, B, ...)` recovers the crops (what `DINOLoss` takes).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from components.model.masking import MaskingGenerator
from components.model.vit import IMAGENET_MEAN, IMAGENET_STD


def _blur(p: float, sigma: tuple[float, float]) -> v2.Transform:
    # Gaussian blur with kernel 9 and sigma drawn in `sigma` ([0.1, 2] in the paper) applied with probability p.
    # (The release's GaussianBlur wrapper hands RandomApply 1 - p; we follow the paper and the issue.)
    return v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=sigma)], p=p)


class MultiCropAugmentation:
    """Two global crops and N local crops of one image, as in DINOv2.

    Both global crops: RandomResizedCrop (224 px, scale 0.32 to 1, bicubic) and a horizontal flip. Every crop: colour
    jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p 0.8 and grayscale with p 0.2. Then Gaussian
    blur (sigma 0.1 to 2 px) with p 1.0 on the first global crop, p 0.1 plus solarisation (threshold 128) with p 0.2 on
    the second, p 0.5 on the local crops (98 px for patch 14, scale 0.05 to 0.32), and ImageNet normalisation.

    The photometric strengths are the release's hard-coded values by default; they are arguments because they encode
    what the features should ignore, and a domain where colour is the signal (or crops far smaller than 224 px, on
    which a 2 px blur removes most of the detail) needs milder ones.

    With `gram_crops_size` (DINOv3's Gram anchoring), each global crop's region is cut at the larger of the two sizes
    and resized (bicubic) to `global_crops_size` for the student, and to `gram_crops_size` for the Gram teacher: the
    same region at a higher resolution. With `gram_no_distortions` the Gram teacher's crop skips the colour, blur and
    solarisation distortions and the student's is resized before them (the release's order); otherwise both come from
    the distorted crop.

    Input: a PIL image, or an image tensor (C, H, W) (uint8, or float in [0, 1]). Output: a dict with
    `global_crops` (list of 2 tensors (3, G, G)), `global_crops_teacher` (the same list) and `local_crops` (list of N
    tensors (3, S, S)), all float32 and normalised; with `gram_crops_size`, `gram_teacher_crops` (list of 2 tensors
    (3, T, T)).
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 98,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_prob: float = 0.2,
        gram_crops_size: int | None = None,
        gram_no_distortions: bool = True,
    ) -> None:
        self.local_crops_number = local_crops_number
        self.gram_crops_size, self.gram_no_distortions = gram_crops_size, gram_no_distortions
        bicubic = InterpolationMode.BICUBIC
        # Solarisation's threshold 128 and the jitter are defined on 8-bit images: work in uint8 until normalising.
        to_uint8 = v2.Compose([v2.ToImage(), v2.ToDtype(torch.uint8, scale=True)])
        brightness, contrast, saturation, hue = color_jitter
        colour = v2.Compose(
            [
                v2.RandomApply(
                    [v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)],
                    p=color_jitter_prob,
                ),
                v2.RandomGrayscale(p=grayscale_prob),
            ]
        )
        normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()])

        def geometric(size: int, scale: tuple[float, float]) -> v2.Transform:
            return v2.Compose(
                [
                    v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True),
                    v2.RandomHorizontalFlip(p=0.5),
                ]
            )

        self.to_uint8 = to_uint8
        self.normalize = normalize
        # With Gram crops, the region is cut at the larger side and resized for each model (identity at equal sides).
        self.global_geometric = geometric(max(global_crops_size, gram_crops_size or 0), global_crops_scale)
        self.resize_global = v2.Resize(global_crops_size, interpolation=bicubic, antialias=True)
        self.resize_gram = v2.Resize(gram_crops_size or global_crops_size, interpolation=bicubic, antialias=True)
        self.global_distortions_1 = v2.Compose([colour, _blur(1.0, blur_sigma), normalize])
        self.global_distortions_2 = v2.Compose(
            [colour, _blur(0.1, blur_sigma), v2.RandomSolarize(threshold=128, p=solarize_prob), normalize]
        )
        self.local_transform = v2.Compose(
            [geometric(local_crops_size, local_crops_scale), colour, _blur(0.5, blur_sigma), normalize]
        )

    def __call__(self, image: Any) -> dict[str, list[Tensor]]:
        image = self.to_uint8(image)
        pairs = [self._global_crop(image, d) for d in (self.global_distortions_1, self.global_distortions_2)]
        global_crops = [crop for crop, _ in pairs]
        local_crops = [self.local_transform(image) for _ in range(self.local_crops_number)]
        out = {"global_crops": global_crops, "global_crops_teacher": global_crops, "local_crops": local_crops}
        if self.gram_crops_size is not None:
            out["gram_teacher_crops"] = [gram for _, gram in pairs]
        return out

    def _global_crop(self, image: Tensor, distortions: v2.Transform) -> tuple[Tensor, Tensor | None]:
        """A global crop (3, G, G) and, with `gram_crops_size`, the Gram teacher's crop of its region (3, T, T)."""
        region = self.global_geometric(image)  # (3, max(G, T), max(G, T)) uint8
        if self.gram_crops_size is None:
            return distortions(region), None
        if self.gram_no_distortions:
            return distortions(self.resize_global(region)), self.normalize(self.resize_gram(region))
        distorted = distortions(region)
        return self.resize_global(distorted), self.resize_gram(distorted)


def augmentation_from_config(
    crops_cfg: Any, *, gram_crops_size: int | None = None, gram_no_distortions: bool = True
) -> MultiCropAugmentation:
    """`MultiCropAugmentation` from the project's `CropsConfig` (params.yaml `crops` section), with the Gram
    teacher's crops when `gram_crops_size` is given (a phase's `GramPlan`)."""
    return MultiCropAugmentation(
        global_crops_scale=tuple(crops_cfg.global_crops_scale),
        local_crops_scale=tuple(crops_cfg.local_crops_scale),
        local_crops_number=crops_cfg.local_crops_number,
        global_crops_size=crops_cfg.global_crops_size,
        local_crops_size=crops_cfg.local_crops_size,
        color_jitter=tuple(crops_cfg.color_jitter),
        color_jitter_prob=crops_cfg.color_jitter_prob,
        grayscale_prob=crops_cfg.grayscale_prob,
        blur_sigma=tuple(crops_cfg.blur_sigma),
        solarize_prob=crops_cfg.solarize_prob,
        gram_crops_size=gram_crops_size,
        gram_no_distortions=gram_no_distortions,
    )


class MultiCropCollate:
    """Collates `MultiCropAugmentation` outputs and draws the iBOT masks, as the release's `collate_data_and_cast`.

    Of the 2 B global crops, int(2 B x mask_probability) get a block-wise mask; their target ratios are spread
    linearly over `mask_ratio_min_max` (crop i draws its ratio uniformly in the i-th of as many equal bins), the
    others get an empty mask, and the masks are shuffled over the crops.

    Args:
        patch_grid: the patch grid of a global crop, (H, W) or its side (224 / 14 = 16).
        mask_ratio_min_max: the range of masking ratios (0.1, 0.5).
        mask_probability: the share of global crops that are masked (0.5).
        dtype: dtype of the collated crops (the engine may ask for bfloat16).
        mask_generator: a `MaskingGenerator` over `patch_grid`; default: blocks of up to half the grid.
        rng: source of randomness for ratios and shuffling; None uses the `random` module (reseeded per worker).

    Call with a list of samples, each the augmentation's dict or a (dict, target) pair. Returns a dict:
        collated_global_crops (2 B, 3, G, G); collated_local_crops (L B, 3, S, S);
        collated_gram_teacher_crops (2 B, 3, T, T) when the samples have Gram teacher crops;
        collated_masks (2 B, N) bool, True where masked; mask_indices_list (M,) flat indices of the masked patches
        in collated_masks.flatten(); masks_weight (M,) 1 / (masked patches of the patch's image);
        n_masked_patches (1,) long, M; upperbound, an int >= M (a static size for padding);
        n_global_crops and n_local_crops, ints.
    """

    def __init__(
        self,
        patch_grid: int | tuple[int, int],
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        dtype: torch.dtype = torch.float32,
        mask_generator: MaskingGenerator | None = None,
        rng: random.Random | None = None,
    ) -> None:
        grid = (patch_grid, patch_grid) if isinstance(patch_grid, int) else tuple(patch_grid)
        self.n_tokens = grid[0] * grid[1]
        self.mask_ratio_min_max = tuple(mask_ratio_min_max)
        self.mask_probability = mask_probability
        self.dtype = dtype
        self.mask_generator = mask_generator or MaskingGenerator(grid, max_num_patches=0.5 * self.n_tokens, rng=rng)
        if self.mask_generator.shape != grid:
            raise ValueError(f"mask generator grid {self.mask_generator.shape} != patch grid {grid}")
        self.rng = rng

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        rnd = self.rng or random
        crops: list[Mapping[str, list[Tensor]]] = [s[0] if isinstance(s, tuple | list) else s for s in samples]
        n_global, n_local = len(crops[0]["global_crops"]), len(crops[0]["local_crops"])
        # Crop-major: all images' crop 0, then all images' crop 1, ...
        global_crops = torch.stack([c["global_crops"][i] for i in range(n_global) for c in crops])  # (G B, 3, G, G)
        if n_local:
            local_crops = torch.stack([c["local_crops"][i] for i in range(n_local) for c in crops])  # (L B, 3, S, S)
        else:
            local_crops = torch.empty(0, dtype=self.dtype)

        B, N = len(global_crops), self.n_tokens
        n_masked_crops = int(B * self.mask_probability)
        ratios = torch.linspace(*self.mask_ratio_min_max, n_masked_crops + 1).tolist()
        masks, upperbound = [], 0
        for i in range(n_masked_crops):
            masks.append(self.mask_generator(int(N * rnd.uniform(ratios[i], ratios[i + 1]))).flatten())
            upperbound += int(N * ratios[i + 1])
        masks += [torch.zeros(N, dtype=torch.bool) for _ in range(B - n_masked_crops)]
        rnd.shuffle(masks)

        collated_masks = torch.stack(masks)  # (G B, N)
        mask_indices = collated_masks.flatten().nonzero().flatten()  # (M,)
        per_image = 1.0 / collated_masks.sum(-1).clamp(min=1.0)  # (G B,)
        masks_weight = per_image.unsqueeze(-1).expand_as(collated_masks)[collated_masks]  # (M,)
        gram = {}
        if "gram_teacher_crops" in crops[0]:  # crop-major, like the global crops they show
            stacked = torch.stack([c["gram_teacher_crops"][i] for i in range(n_global) for c in crops])
            gram["collated_gram_teacher_crops"] = stacked.to(self.dtype)  # (G B, 3, T, T)
        return gram | {
            "collated_global_crops": global_crops.to(self.dtype),
            "collated_local_crops": local_crops.to(self.dtype),
            "collated_masks": collated_masks,
            "mask_indices_list": mask_indices,
            "masks_weight": masks_weight,
            "upperbound": upperbound,
            "n_masked_patches": torch.full((1,), fill_value=mask_indices.shape[0], dtype=torch.long),
            "n_global_crops": n_global,
            "n_local_crops": n_local,
        }


def collate_from_config(
    crops_cfg: Any, ibot_cfg: Any, patch_size: int, dtype: torch.dtype = torch.float32
) -> MultiCropCollate:
    """`MultiCropCollate` from the project's `CropsConfig`, `IbotConfig` and the backbone's patch size."""
    return MultiCropCollate(
        patch_grid=crops_cfg.global_crops_size // patch_size,
        mask_ratio_min_max=tuple(ibot_cfg.mask_ratio_min_max),
        mask_probability=ibot_cfg.mask_sample_probability,
        dtype=dtype,
    )


def eval_transform(
    image_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Transform:
    """The release's evaluation preprocessing: bicubic resize of the shorter side (256 for 224), centre crop,
    ImageNet normalisation. Input: PIL image or image tensor; output: float32 (3, image_size, image_size)."""
    resize_size = resize_size or round(image_size * 256 / 224)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
            v2.ToPureTensor(),
        ]
    )
