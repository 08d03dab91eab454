"""Mask2Former's training objective: Hungarian matching and the set losses, on sampled points.

Targets of an image for semantic segmentation: one binary mask per class present (ignored pixels in none of them).
For every decoder stage's predictions (N queries: class logits over C + 1 with "no object" last, mask logits):

- Matching (per image, Hungarian, scipy's `linear_sum_assignment`) on the cost
  2 * (-p_q(c_t)) + 5 * BCE(m_q, t) + 5 * dice(m_q, t), the mask terms computed on K points drawn uniformly in the
  image (the same points for every query and target): BCE = mean over points of the sigmoid cross-entropy, and
  dice = 1 - (2 sum sigma(m) t + 1) / (sum sigma(m) + sum t + 1).
- Losses: cross-entropy of every query's class logits against its matched class or "no object" (weight 0.1 for "no
  object", 1 for the classes; a weighted mean), and for matched pairs the sigmoid BCE and dice losses on K points
  chosen by uncertainty (3K candidates drawn uniformly, the 0.75 K whose logit is closest to 0, plus 0.25 K drawn
  uniformly), each summed over masks and divided by the number of target masks in the batch. Weights 2 (class),
  5 (mask), 5 (dice), the same for every stage (the auxiliary losses of the earlier stages).

Points are normalised (x, y) in [0, 1] read by bilinear interpolation (`point_sample`), so predictions (at 1/4) and
targets (full resolution) need not share a size. K = 12544 (112 x 112) in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

CLASS_WEIGHT, MASK_WEIGHT, DICE_WEIGHT = 2.0, 5.0, 5.0
NO_OBJECT_WEIGHT = 0.1
OVERSAMPLE_RATIO, IMPORTANCE_RATIO = 3.0, 0.75


@dataclass(frozen=True)
class Target:
    """One image's semantic targets: classes (T,) and binary masks (T, H, W) float."""

    labels: Tensor
    masks: Tensor


def semantic_targets(mask: Tensor, ignore_index: int) -> Target:
    """A class-index mask (H, W) -> one binary mask per class present (ascending class order)."""
    classes = torch.unique(mask)
    classes = classes[classes != ignore_index]
    return Target(classes.long(), (mask[None] == classes[:, None, None]).float())


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of maps (N, C, H, W) at normalised (x, y) points (N, K, 2) -> (N, C, K)."""
    return F.grid_sample(maps, 2.0 * points[:, :, None] - 1.0, mode="bilinear", align_corners=False)[..., 0]


def dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """(Q, K) mask logits and (T, K) targets -> (Q, T) dice costs 1 - (2 sum p t + 1) / (sum p + sum t + 1)."""
    p = logits.sigmoid()
    return 1.0 - (2.0 * p @ targets.T + 1.0) / (p.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1.0)


def bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """(Q, K) mask logits and (T, K) targets -> (Q, T) mean sigmoid cross-entropy over the points."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")  # -log sigma
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")  # -log(1 - sigma)
    return (pos @ targets.T + neg @ (1.0 - targets).T) / logits.shape[-1]


def matching_cost(class_logits: Tensor, mask_logits: Tensor, labels: Tensor, target_points: Tensor) -> Tensor:
    """(Q, T) matching cost of one image: class logits (Q, C + 1), mask logits (Q, K) and targets (T, K) at the
    same K points, target classes (T,)."""
    prob = class_logits.softmax(-1)[:, labels]  # (Q, T)
    return (
        CLASS_WEIGHT * -prob
        + MASK_WEIGHT * bce_cost(mask_logits, target_points)
        + DICE_WEIGHT * dice_cost(mask_logits, target_points)
    )


@torch.no_grad()
def hungarian_match(
    class_logits: Tensor,
    mask_logits: Tensor,
    targets: Sequence[Target],
    *,
    num_points: int,
    generator: torch.Generator,
    points: Tensor | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Per image, the (query indices, target indices) of the minimum-cost assignment.

    Args:
        class_logits: (B, Q, C + 1).
        mask_logits: (B, Q, h, w).
        targets: One `Target` per image, masks of one size (H, W) for the whole batch.
        num_points: K, points drawn uniformly per image for the mask costs.
        generator: Draws the points (on the CPU, so that a run is reproducible on any device).
        points: (B, K, 2) points to use instead of drawing them.
    """
    B = len(targets)
    if points is None:
        points = torch.rand(B, num_points, 2, generator=generator)  # one draw per image
    points = points.to(mask_logits.device)
    pred = point_sample(mask_logits.float(), points)  # (B, Q, K): the queries as channels
    counts = [len(t.labels) for t in targets]
    owner = torch.repeat_interleave(torch.arange(B, device=points.device), torch.tensor(counts, device=points.device))
    masks = torch.cat([t.masks for t in targets])[:, None].to(pred)  # (sum T, 1, H, W)
    tgt = point_sample(masks, points[owner])[:, 0].split(counts)  # per image (T, K)
    matches = []
    for b, target in enumerate(targets):
        cost = matching_cost(class_logits[b].float(), pred[b], target.labels.to(pred.device), tgt[b])
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        matches.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return matches


def uncertain_points(logits: Tensor, num_points: int, generator: torch.Generator) -> Tensor:
    """Mask2Former's importance sampling: (N, 1, h, w) logits -> (N, K, 2) points, 0.75 K of the 3 K uniform
    candidates with the most uncertain logits (closest to 0), then 0.25 K uniform ones."""
    n = logits.shape[0]
    candidates = torch.rand(n, int(num_points * OVERSAMPLE_RATIO), 2, generator=generator).to(logits.device)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()  # (N, 3 K)
    k = int(num_points * IMPORTANCE_RATIO)
    index = uncertainty.topk(k, dim=1).indices  # (N, k)
    chosen = torch.gather(candidates, 1, index[..., None].expand(-1, -1, 2))
    uniform = torch.rand(n, num_points - k, 2, generator=generator).to(logits.device)
    return torch.cat([chosen, uniform], dim=1)


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Sum over masks of 1 - (2 sum p t + 1) / (sum p + sum t + 1), over `num_masks`; (M, K) logits and targets."""
    p = logits.sigmoid()
    return (1.0 - (2.0 * (p * targets).sum(-1) + 1.0) / (p.sum(-1) + targets.sum(-1) + 1.0)).sum() / num_masks


def bce_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Sum over masks of the mean sigmoid cross-entropy over points, over `num_masks`."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1).sum() / num_masks


def class_loss(class_logits: Tensor, matches: Sequence[tuple[Tensor, Tensor]], targets: Sequence[Target]) -> Tensor:
    """Weighted cross-entropy of every query: its matched class, else "no object" (the last class, weight 0.1)."""
    B, Q, C1 = class_logits.shape
    goal = torch.full((B, Q), C1 - 1, dtype=torch.long, device=class_logits.device)
    for b, ((rows, cols), target) in enumerate(zip(matches, targets, strict=True)):
        goal[b, rows.to(goal.device)] = target.labels[cols].to(goal.device)
    weight = torch.ones(C1, device=class_logits.device)
    weight[-1] = NO_OBJECT_WEIGHT
    return F.cross_entropy(class_logits.float().transpose(1, 2), goal, weight=weight)


def stage_loss(
    class_logits: Tensor,
    mask_logits: Tensor,
    targets: Sequence[Target],
    *,
    num_points: int,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """`ce`, `mask` and `dice` losses (unweighted) of one decoder stage's predictions against the targets."""
    matches = hungarian_match(class_logits, mask_logits, targets, num_points=num_points, generator=generator)
    num_masks = float(max(1, sum(len(t.labels) for t in targets)))
    pred = torch.cat([mask_logits[b, rows.to(mask_logits.device)] for b, (rows, _) in enumerate(matches)])
    tgt = torch.cat([t.masks[cols.to(t.masks.device)] for t, (_, cols) in zip(targets, matches, strict=True)])
    losses = {"ce": class_loss(class_logits, matches, targets)}
    if len(pred) == 0:
        zero = mask_logits.sum() * 0.0
        return {**losses, "mask": zero, "dice": zero}
    pred = pred[:, None].float()  # (M, 1, h, w)
    with torch.no_grad():
        points = uncertain_points(pred, num_points, generator)  # (M, K, 2)
    pred_points = point_sample(pred, points)[:, 0]  # (M, K)
    tgt_points = point_sample(tgt[:, None].to(pred_points.device), points)[:, 0]
    return {**losses, "mask": bce_loss(pred_points, tgt_points, num_masks),
            "dice": dice_loss(pred_points, tgt_points, num_masks)}  # fmt: skip


def mask2former_loss(
    outputs: Sequence[tuple[Tensor, Tensor]], targets: Sequence[Target], *, num_points: int, generator: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    """The weighted sum over every decoder stage (the last and the auxiliary ones) of 2 ce + 5 mask + 5 dice, and the
    last stage's unweighted terms (for logging)."""
    total = outputs[-1][0].new_zeros(()).float()
    terms: dict[str, Tensor] = {}
    for class_logits, mask_logits in outputs:
        terms = stage_loss(class_logits, mask_logits, targets, num_points=num_points, generator=generator)
        total = total + CLASS_WEIGHT * terms["ce"] + MASK_WEIGHT * terms["mask"] + DICE_WEIGHT * terms["dice"]
    return total, {k: float(v.detach()) for k, v in terms.items()}
