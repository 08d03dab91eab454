"""The streaming multi-crop loader over the curated manifest: deterministic from the seed, sharded per rank, resumable.

The data is an endless stream of positions 0, 1, 2, ...: position p is image `perm_e[p mod n]` of epoch e = p // n,
where `perm_e` is a seeded permutation of the n manifest rows. A global micro-batch is M = B x world consecutive
positions; rank r takes its B positions [r B, (r + 1) B) of it. Everything random about a sample is seeded by its
position alone: the crops (torchvision's v2 transforms under a per-sample torch seed), the fallback image when one
fails to decode, and the iBOT masks, planned over the whole global micro-batch as the release plans them over a
batch (a share of the 2 M global crops masked, ratios spread linearly, shuffled). So:

- a batch does not depend on the number of data-loading workers or on which worker built it;
- the union of the ranks' batches does not depend on the number of ranks: 1 rank with B = 64 sees exactly the
  crops and masks that 2 ranks with B = 32 see together;
- resuming needs one number, the position reached (`samples_seen`), and reproduces the uninterrupted stream.

A phase with mixed crop sizes (DINOv3's high-resolution adaptation, the plan's `crop_sizes`) draws one (global,
local) pair per optimizer step, for every image of the step on every rank: `crop_pair_index(seed, step, ratios)`,
step = position // global batch, a pure function of the two (the release's combined loader draws from one generator
seeded alike on every rank, which a restart sets back; here a resumed run draws exactly the pairs it would have).
The sampler marks each sample with its pair (`SampleRef.crop_pair`), the dataset crops at that pair's sides and the
collate plans the masks on that pair's patch grid. All pairs read the one stream of positions.

Images are read through `components.storage.read_bytes` (local paths, `s3://`, tar members), lazily, by the workers.
An image that fails to read or decode is counted and replaced by a seeded draw from the manifest, never a crash.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from components import storage
from components.log import get_logger
from components.model import MaskingGenerator, MultiCropCollate

log = get_logger(__name__)

MAX_DECODE_TRIES = 16
"""Fallback images tried after a failed decode before the loader gives up (a manifest of unreadable files)."""


class SampleRef(NamedTuple):
    """Where a sample sits in the stream: its position, its global micro-batch (start, index in it, size), and the
    crop-size pair of its step (0 in a phase of one size)."""

    position: int
    micro_start: int
    index: int
    micro_size: int
    crop_pair: int = 0


def mix_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence), e.g. (seed, position)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def crop_pair_index(seed: int, step: int, ratios: Sequence[float]) -> int:
    """The crop-size pair of optimizer step `step` (0-based, of its phase): pair i with probability `ratios[i]`,
    drawn from a generator seeded by (seed, step) alone, so every rank and a resumed run draw the same."""
    if len(ratios) == 1:
        return 0
    u = np.random.default_rng(mix_seed(seed, step, 0xC809)).random() * float(sum(ratios))  # in [0, total)
    return min(int(np.searchsorted(np.cumsum(ratios), u, side="right")), len(ratios) - 1)


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Runs a block under torch's CPU generator seeded with `seed`, then restores the generator's state (so that
    a loader in the main process never disturbs the training RNG)."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Per-image transforms are many tiny ops: one thread (a pool of several is far slower on them)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def _read_manifest(curated: str, columns: Sequence[str]) -> Any:
    """The given columns of `<curated>/manifest.parquet` that it has (`uri` required), as a DataFrame."""
    import pandas as pd
    import pyarrow.parquet as pq

    path = storage.join(curated, "manifest.parquet")
    source = io.BytesIO(storage.read_bytes(path)) if storage.is_s3(path) else path
    present = set(pq.read_schema(source).names)
    if "uri" not in present:
        raise ValueError(f"{path}: the curated manifest has no `uri` column")
    if isinstance(source, io.BytesIO):
        source.seek(0)
    frame = pd.read_parquet(source, columns=[c for c in columns if c in present])
    if frame.empty:
        raise ValueError(f"{path}: the curated manifest has no rows")
    return frame


def read_manifest(curated: str) -> tuple[list[str], str]:
    """One read of `<curated>/manifest.parquet` (a local folder or an s3:// prefix): (the `uri` column in manifest
    order, the training set's identity).

    The identity hashes the images in order, each by `uri` and, where the manifest has it (the curate stage writes
    it), the `sha256` of its bytes, so re-encoded images under the same names count as other data.
    """
    frame = _read_manifest(curated, ["uri", "sha256"])
    uris = frame["uri"].astype(str).tolist()
    hashes = frame["sha256"].astype(str).tolist() if "sha256" in frame.columns else [""] * len(uris)
    digest = hashlib.sha256()
    for uri, sha in zip(uris, hashes, strict=True):
        digest.update(f"{uri}\t{sha}\n".encode())
    return uris, digest.hexdigest()[:16]


def read_manifest_uris(curated: str) -> list[str]:
    """The `uri` column of the curated manifest, in manifest order (`read_manifest`)."""
    return read_manifest(curated)[0]


def manifest_digest(curated: str) -> str:
    """The training set's identity (`read_manifest`)."""
    return read_manifest(curated)[1]


# --------------------------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------------------------


class StreamPlan(NamedTuple):
    """This rank's share of the position stream, and the crop-size pair of each step (see the module docstring)."""

    micro_batch_size: int
    rank: int
    world_size: int
    grad_accum_steps: int = 1
    crop_ratios: tuple[float, ...] = (1.0,)
    """The probability of each crop-size pair per step (one pair: every step's is 0)."""
    seed: int = 0
    """The run's seed (the crop-size draws)."""

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    def micro_batches(self, start_position: int) -> Iterator[list[SampleRef]]:
        """This rank's micro-batches from `start_position` (a step's first position) on, forever."""
        B, M = self.micro_batch_size, self.global_micro_batch
        step_size = M * self.grad_accum_steps  # the global batch: positions per optimizer step
        start = start_position
        while True:
            first, pair = start + self.rank * B, crop_pair_index(self.seed, start // step_size, self.crop_ratios)
            yield [SampleRef(first + j, start, self.rank * B + j, M, pair) for j in range(B)]
            start += M


class _Refs:
    """An endless batch sampler over `StreamPlan.micro_batches` (what `DataLoader(batch_sampler=...)` iterates)."""

    def __init__(self, plan: StreamPlan, start_position: int) -> None:
        self.plan, self.start_position = plan, start_position

    def __iter__(self) -> Iterator[list[SampleRef]]:
        return self.plan.micro_batches(self.start_position)


@lru_cache(maxsize=2)
def _epoch_permutation(seed: int, n: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(mix_seed(seed, epoch, 0x5EED)).permutation(n)


def image_index(seed: int, n: int, position: int) -> int:
    """The manifest row at stream `position`: the epoch's seeded permutation, epoch = position // n."""
    return int(_epoch_permutation(seed, n, position // n)[position % n])


def decode_rgb(data: bytes) -> Image.Image:
    """Decodes image bytes to RGB (fully loaded, so that a truncated file fails here, not in a transform)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


class MultiCropDataset(Dataset):
    """Map-style dataset indexed by `SampleRef`: the multi-crop views of the image at that stream position.

    Args:
        uris: the manifest's image URIs.
        seed: the run's seed.
        augmentation: the model core's `MultiCropAugmentation` (or any callable image -> crops dict), or one per
            crop-size pair, picked by the sample's `SampleRef.crop_pair`.
    """

    def __init__(self, uris: Sequence[str], seed: int, augmentation: Any) -> None:
        import pyarrow as pa

        self.uris = pa.array(list(uris), type=pa.string())  # one buffer: no copy-on-read in forked workers
        self.seed = seed
        self.augmentations = list(augmentation) if isinstance(augmentation, Sequence) else [augmentation]

    def __len__(self) -> int:
        return len(self.uris)

    def _candidates(self, position: int) -> Iterator[int]:
        n = len(self.uris)
        yield image_index(self.seed, n, position)
        fallback = np.random.default_rng(mix_seed(self.seed, position, 0xBAD))
        yield from (int(i) for i in fallback.integers(0, n, size=MAX_DECODE_TRIES))

    def __getitem__(self, ref: SampleRef) -> dict[str, Any]:
        failures = 0
        for index in self._candidates(ref.position):
            uri = self.uris[index].as_py()
            try:
                image = decode_rgb(storage.read_bytes(uri))
                break
            except Exception as err:  # any unreadable image is skipped and counted, whatever the decoder raised
                failures += 1
                log.warning("skipping undecodable image %s: %s: %s", uri, type(err).__name__, err)
        else:
            raise RuntimeError(f"no decodable image among {failures} tried for stream position {ref.position}")
        with seeded_torch(mix_seed(self.seed, ref.position)), _one_thread():
            crops = self.augmentations[ref.crop_pair](image)
        return {"crops": crops, "ref": ref, "failures": failures}


# --------------------------------------------------------------------------------------------------------------------
# Masks planned over the global micro-batch
# --------------------------------------------------------------------------------------------------------------------


class PlannedMaskCollate:
    """Stacks crops with the model core's `MultiCropCollate` and draws the iBOT masks from a plan over the global
    micro-batch, so that masks do not depend on how the batch is split over ranks.

    The plan follows the release's collate: of the C = n_global x M global crops of the global micro-batch,
    int(C x mask_probability) are masked; a seeded shuffle assigns them the linearly spaced ratio bins of
    `mask_ratio_min_max`; each masked crop draws its ratio in its bin and its blocks from its own seeded generator.
    Output keys are those of `MultiCropCollate`, plus `decode_failures` (int) and `positions` (B,).

    `patch_grid` is the side of a global crop's patch grid, or one side per crop-size pair: a batch's masks are
    drawn on the grid of its samples' pair (`SampleRef.crop_pair`).
    """

    def __init__(
        self,
        *,
        seed: int,
        patch_grid: int | Sequence[int],
        mask_ratio_min_max: tuple[float, float],
        mask_probability: float,
    ) -> None:
        self.seed = seed
        self.grids = [patch_grid] if isinstance(patch_grid, int) else list(patch_grid)
        self.ratio_range = tuple(mask_ratio_min_max)
        self.mask_probability = mask_probability
        self.stack = MultiCropCollate(self.grids[0], self.ratio_range, mask_probability=0.0)  # crops only
        self.generators = [MaskingGenerator(g, max_num_patches=0.5 * g * g) for g in self.grids]

    def plan_masks(self, refs: Sequence[SampleRef], n_global: int) -> tuple[torch.Tensor, int]:
        """Masks (n_global B, N) for these samples, crop-major, and the release's `upperbound` of their count; N is
        the patch count of their crop-size pair's global crops."""
        micro_start, M = refs[0].micro_start, refs[0].micro_size
        generator = self.generators[refs[0].crop_pair]
        n_tokens = self.grids[refs[0].crop_pair] ** 2
        n_crops = n_global * M
        n_masked = int(n_crops * self.mask_probability)
        bins = np.linspace(*self.ratio_range, n_masked + 1)
        order = np.random.default_rng(mix_seed(self.seed, micro_start, 0x3A5C)).permutation(n_crops)
        rank_of = np.empty(n_crops, dtype=np.int64)
        rank_of[order] = np.arange(n_crops)  # rank_of[crop] < n_masked: the crop is masked with bin rank_of[crop]
        masks, upperbound = [], 0
        for c in range(n_global):
            for ref in refs:
                crop = c * M + ref.index  # crop-major over the global micro-batch
                r = int(rank_of[crop])
                if r >= n_masked:
                    masks.append(torch.zeros(n_tokens, dtype=torch.bool))
                    continue
                rng = random.Random(mix_seed(self.seed, micro_start, crop))
                generator.rng = rng
                ratio = rng.uniform(bins[r], bins[r + 1])
                masks.append(generator(int(n_tokens * ratio)).flatten())
                upperbound += int(n_tokens * bins[r + 1])
        return torch.stack(masks), upperbound

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        refs = [s["ref"] for s in samples]
        if len({(r.micro_start, r.micro_size, r.crop_pair) for r in refs}) != 1:
            raise ValueError("a batch must come from one global micro-batch")
        batch = self.stack([s["crops"] for s in samples])
        masks, upperbound = self.plan_masks(refs, batch["n_global_crops"])
        indices = masks.flatten().nonzero().flatten()  # (M_masked,)
        per_image = 1.0 / masks.sum(-1).clamp(min=1.0)  # (G B,)
        batch.update(
            collated_masks=masks,
            mask_indices_list=indices,
            masks_weight=per_image.unsqueeze(-1).expand_as(masks)[masks],
            n_masked_patches=torch.full((1,), indices.numel(), dtype=torch.long),
            upperbound=upperbound,
            decode_failures=sum(s["failures"] for s in samples),
            positions=torch.tensor([r.position for r in refs]),
        )
        return batch


# --------------------------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------------------------


def build_loader(
    *,
    uris: Sequence[str],
    plan: Any,
    rank: int,
    world_size: int,
    start_position: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """The endless loader of this rank's collated micro-batches from `start_position` (see the module docstring).

    Args:
        uris: the curated manifest's URIs.
        plan: the phase's `PhasePlan` (seed, model.patch_size, its crop-size pairs and Gram teacher crops, ibot
            masking, batch).
        rank: this process's rank; world_size: the number of ranks.
        start_position: the stream position to start from (`samples_seen` of a checkpoint; 0 for a fresh run).
        num_workers: data-loading processes (`train.num_workers`).
        pin_memory: pin batches for asynchronous copies to a GPU.
    """
    from components.model import augmentation_from_config

    pairs = plan.crop_pairs()  # (crops, Gram teacher crop side) of each crop-size pair; one unless sizes mix
    no_distortions = plan.gram.teacher_no_distortions if plan.gram is not None else True
    augmentations = [
        augmentation_from_config(crops, gram_crops_size=gram_side, gram_no_distortions=no_distortions)
        for crops, gram_side in pairs
    ]
    dataset = MultiCropDataset(uris, plan.seed, augmentations)
    collate = PlannedMaskCollate(
        seed=plan.seed,
        patch_grid=[crops.global_crops_size // plan.model.patch_size for crops, _ in pairs],
        mask_ratio_min_max=plan.ibot.mask_ratio_min_max,
        mask_probability=plan.ibot.mask_sample_probability,
    )
    ratios = plan.crop_sizes.ratios if plan.crop_sizes is not None else (1.0,)
    stream = StreamPlan(plan.batch.per_rank, rank, world_size, plan.batch.grad_accum_steps, ratios, plan.seed)
    return DataLoader(
        dataset,
        batch_sampler=_Refs(stream, start_position),
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
        worker_init_fn=_worker_init if num_workers else None,
        generator=torch.Generator().manual_seed(plan.seed),  # never draw from (and shift) the training generator
    )


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding and crops are per-sample work; threads would fight the training process


def manifest_path(curated: str | Path) -> str:
    return storage.join(str(curated), "manifest.parquet")
