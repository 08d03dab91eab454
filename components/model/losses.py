"""The self-supervised losses: DINO (image level), iBOT (patch level), the KoLeo regulariser (per rank, or over
groups of images across ranks as DINOv3 runs it) and DINOv3's Gram anchoring.

Each loss works on one process or many: the cross-process reductions (the centre's batch mean, the Sinkhorn-Knopp
sums) go through `torch.distributed` only when a process group is initialised. Nothing here moves tensors between
devices or knows about DeepSpeed.

Notation follows the paper: K prototypes, B samples (images for DINO, masked patches for iBOT), teacher
temperature tau_t (0.04 -> 0.07 warm-up), student temperature tau_s = 0.1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from components.runtime import several_ranks


def _all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """In-place sum (or max) over all ranks when there are several; identity otherwise."""
    if several_ranks():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


# --------------------------------------------------------------------------------------------------------------------
# Teacher transforms
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp centring of teacher logits (Caron et al. 2020, SwAV), over all ranks.

    Finds Q close to exp(logits / tau_t) whose prototype marginals are uniform (each prototype gets 1 / K of the
    mass over the global batch) and whose per-sample columns sum to 1. The sample count B is the number of rows
    summed over all ranks (for iBOT: the masked patches of every rank), so ranks may hold different counts.

    Q is K-by-B as in the paper, Q = diag(r) P diag(c) with P = exp(logits / tau_t): each round of the release's
    row and column normalisations sets r = 1 / (K P c) and c = 1 / (B r^T P). Keeping the two scaling vectors
    instead of rescaling Q reads P twice per round and writes it once at the end (the release's rounds each read and
    write the whole (K, B) matrix several times); the result is the same up to float rounding.

    Args:
        teacher_logits: (B_local, K) teacher head outputs.
        teacher_temp: tau_t.
        n_iterations: row/column normalisation rounds (3 in DINOv2).

    Returns:
        (B_local, K) float32 targets, each row a probability distribution.
    """
    logits = teacher_logits.float() / teacher_temp
    # A global shift cancels in the normalisations and keeps exp() finite at low temperatures.
    shift = logits.amax() if logits.numel() else logits.new_full((), float("-inf"))
    shift = _all_reduce(shift.clone(), "max")
    P = torch.exp(logits - shift)  # P^T: (B_local, K)
    K = P.shape[1]
    B = _all_reduce(P.new_full((), P.shape[0]))  # samples over all ranks, counted on the device
    c = P.new_ones(P.shape[0])  # (B_local,) column scales
    for _ in range(n_iterations):
        r = 1.0 / (K * _all_reduce(c @ P))  # (K,) each prototype (row of Q) gets total mass 1 / K ...
        c = 1.0 / (B * (P @ r))  # (B_local,) ... and each sample (column of Q) 1 / B; columns are local
    return P.mul_(r).mul_((B * c).unsqueeze(1))  # B Q^T: rows sum to 1, an assignment per sample


class _CenteredTeacher(nn.Module):
    """The teacher-side transforms shared by the DINO and iBOT losses: EMA-centred softmax and Sinkhorn-Knopp.

    `update_center(teacher_logits)` starts an asynchronous all-reduce of the batch sum (so that it overlaps the
    student's forward and backward); the new centre is applied lazily by the next `softmax_center_teacher` call or
    by `apply_center_update()`. The centre is the EMA (momentum 0.9) of the mean teacher logit over every row of
    every rank.
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # (1, K)
        self._pending: tuple[Tensor, dist.Work | None] | None = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """softmax((logits - centre) / tau_t) over the K prototypes: (..., K) -> (..., K) float32."""
        self.apply_center_update()
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Sinkhorn-Knopp targets (B_local, K) of `sinkhorn_knopp`; the sample count is summed over ranks."""
        return sinkhorn_knopp(teacher_logits.flatten(0, -2), teacher_temp, n_iterations).view_as(teacher_logits)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """Starts the centre update with this step's teacher logits (..., K); applied on next use."""
        self.apply_center_update()
        rows = teacher_logits.detach().float().flatten(0, -2)  # (B_local, K)
        count = rows.new_full((1, 1), rows.shape[0])
        packed = torch.cat((rows.sum(0, keepdim=True), count), dim=1)  # (1, K + 1): batch sum and row count
        work = dist.all_reduce(packed, async_op=True) if several_ranks() else None
        self._pending = (packed, work)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Waits for a pending centre reduction and applies the EMA; no-op without one."""
        if self._pending is None:
            return
        packed, work = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        total, count = packed[:, :-1], packed[0, -1]
        m = self.center_momentum
        updated = self.center * m + total.to(self.center) / count.clamp(min=1.0) * (1 - m)
        self.center.copy_(torch.where(count > 0, updated, self.center))  # no rows anywhere: keep; no host sync


def cross_entropy(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """Per-row -sum_k t_k log softmax(s / tau_s)_k: (..., K), (..., K) -> (...), in float32."""
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_probs).sum(dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# DINO: image level
# --------------------------------------------------------------------------------------------------------------------


class DINOLoss(_CenteredTeacher):
    """DINO's cross-entropy between teacher and student CLS distributions over the multi-crop views.

    The student's global crop g is matched to every teacher global crop except g (crop A against B and B against
    A); each local crop is matched to every teacher global crop. The loss is the sum over these pairs of the mean
    cross-entropy over the batch, divided by the number of pairs.

    Typical use in a step (teacher logits of the G global crops, crop-major as the collate function stacks them):

        probs = loss.sinkhorn_knopp_teacher(t_logits, tau_t)   # or softmax_center_teacher, then update_center
        value = loss(s_global.view(G, B, K), s_local.view(L, B, K), probs.view(G, B, K))
    """

    def forward(
        self, student_global: Tensor, student_local: Tensor | None, teacher_global: Tensor, *, local_weight: float = 1.0
    ) -> Tensor:
        """The DINO loss.

        Args:
            student_global: student logits of the global crops, (G, B, K).
            student_local: student logits of the local crops, (L, B, K), or None (no local crops).
            teacher_global: teacher targets of the global crops (already centred and sharpened), (G, B, K).
            local_weight: w, the weight of the local crops' pairs (DINOv3's `reweight_dino_local_loss`; 1 in DINOv2).
                The release weighs its global and local means by their shares of the pairs, G (G - 1) / n and L G / n,
                the local one times w: the sum below with the local pairs times w, over all n pairs.

        Returns:
            A scalar: (sum over the G (G - 1) global pairs + w x sum over the L G local pairs of the batch-mean
            cross-entropy) / (G (G - 1) + L G); with w = 1 the mean over all pairs.
        """
        if student_global.shape != teacher_global.shape:
            raise ValueError(f"student global {tuple(student_global.shape)} != teacher {tuple(teacher_global.shape)}")
        # In float32, as released: under bfloat16 autocast the einsums below would run in bfloat16.
        with torch.autocast(teacher_global.device.type, enabled=False):
            return self._cross_entropy(student_global, student_local, teacher_global, local_weight)

    def _cross_entropy(
        self, student_global: Tensor, student_local: Tensor | None, teacher_global: Tensor, local_weight: float
    ) -> Tensor:
        G = teacher_global.shape[0]
        t = teacher_global.float()
        lsm = F.log_softmax(student_global.float() / self.student_temp, dim=-1)  # (G, B, K)
        pair_ce = -torch.einsum("tbk,sbk->st", t, lsm) / t.shape[1]  # (G_student, G_teacher) batch-mean CE
        total, n_terms = pair_ce.sum() - pair_ce.diagonal().sum(), G * (G - 1)  # a crop is not matched to itself
        if student_local is not None and student_local.shape[0] > 0:
            lsm_local = F.log_softmax(student_local.float() / self.student_temp, dim=-1)  # (L, B, K)
            local = -torch.einsum("tbk,lbk->", t, lsm_local) / t.shape[1]
            total = total + (local if local_weight == 1.0 else local_weight * local)
            n_terms += student_local.shape[0] * G
        return total / max(n_terms, 1)


# --------------------------------------------------------------------------------------------------------------------
# iBOT: patch level
# --------------------------------------------------------------------------------------------------------------------


class iBOTPatchLoss(_CenteredTeacher):  # noqa: N801 (the paper's name)
    """iBOT's masked-image-modelling loss (Zhou et al. 2022): the DINO cross-entropy on masked patch tokens.

    The student sees the mask token at the masked positions; the teacher sees the full image. Each image's masked
    patches are weighted by 1 / its number of masked patches and the sum is divided by the number of images in the
    batch (masked or not), as in the release. An image without masked patches contributes nothing; a batch without
    any gives 0.

    For the teacher transforms, the rows are the masked patches: `sinkhorn_knopp_teacher(t_masked (M, K), tau_t)`
    counts the masked patches over all ranks, and the centre is the mean over masked patches of all ranks.
    """

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, masks: Tensor) -> Tensor:
        """The loss on dense patch outputs.

        Args:
            student_logits: (B, N, K) student head outputs for every patch.
            teacher_probs: (B, N, K) teacher targets.
            masks: (B, N) boolean, True where the student's patch was masked.

        Returns:
            A scalar.
        """
        ce = cross_entropy(student_logits, teacher_probs, self.student_temp)  # (B, N)
        m = masks.to(ce.dtype)
        per_image = (ce * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # (B,)
        return per_image.mean()

    def forward_masked(
        self, student_logits: Tensor, teacher_probs: Tensor, masks_weight: Tensor, n_images: int
    ) -> Tensor:
        """The loss on the masked patches only (what the pretraining step computes, to save the head's work).

        Args:
            student_logits: (M, K) student head outputs of the M masked patches of the batch.
            teacher_probs: (M, K) teacher targets of the same patches.
            masks_weight: (M,) weight of each masked patch, 1 / (its image's masked patch count) (from the collate).
            n_images: images in the batch (masked or not), the denominator.

        Returns:
            A scalar, equal to `forward` on the dense tensors.
        """
        ce = cross_entropy(student_logits, teacher_probs, self.student_temp)  # (M,)
        return (ce * masks_weight.to(ce.dtype)).sum() / max(n_images, 1)


# --------------------------------------------------------------------------------------------------------------------
# KoLeo
# --------------------------------------------------------------------------------------------------------------------


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy regulariser (Sablayrolles et al. 2019), as in DINOv2.

    Minus the mean log distance from each L2-normalised feature to its nearest neighbour in the batch. As in the
    release, the distance is ||x_i - x_nn + eps|| (PyTorch's `pairwise_distance`), so two identical features give a
    finite loss and finite gradients. Computed in float32 whatever the autocast state; local to the rank.

    Args:
        features: (B, D) features, B >= 2.
        eps: added to the difference and to the distance.

    Returns:
        A scalar.
    """
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)  # (B, D)
        with torch.no_grad():
            dots = x @ x.t()  # (B, B) cosine similarities
            dots.fill_diagonal_(-2.0)  # never pick oneself (cosines are >= -1)
            nn_index = dots.argmax(dim=1)  # (B,) nearest neighbour of each sample
        distances = F.pairwise_distance(x, x[nn_index], p=2, eps=eps)  # (B,)
        return -torch.log(distances + eps).mean()


def koleo_loss_distributed(
    features: Tensor, *, topk: int = 1, group_size: int | None = None, eps: float = 1e-8
) -> Tensor:
    """KoLeo over groups of images across ranks, as the DINOv3 release's `KoLeoLossDistributed` computes it.

    Every rank's L2-normalised features are gathered (differentiably: a neighbour's gradient flows back to its rank);
    the global batch is cut into groups of `group_size` images of consecutive ranks, and each of this rank's B
    features finds its `topk` nearest neighbours in its own group (itself excluded). The loss is minus the mean log
    distance over this rank's B x topk pairs. Its mean over ranks (what averaging the gradients over ranks
    optimises) is, with `topk` 1 and one group, `koleo_loss` of the gathered batch. On one process the group is the
    rank's batch. Computed in float32 whatever the autocast state.

    Args:
        features: (B, D) this rank's features; every rank holds the same B.
        topk: neighbours per feature (the release's `koleo_topk`).
        group_size: images per neighbour set (the release's `koleo_distributed_loss_group_size`): a multiple of B
            that divides the global batch; None: the global batch.
        eps: added to the difference and to the distance, as in `koleo_loss`.

    Returns:
        A scalar.

    Raises:
        ValueError: `group_size` is not a multiple of B or does not divide the global batch (`dino.koleo_group_size`).
    """
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)  # (B, D)
        B = x.shape[0]
        if several_ranks():
            from torch.distributed.nn.functional import all_gather

            everyone, rank = torch.cat(all_gather(x.contiguous())), dist.get_rank()  # (W B, D), rank-major
        else:
            everyone, rank = x, 0
        size = len(everyone) if group_size is None else group_size
        if size % B or len(everyone) % size:
            raise ValueError(
                f"dino.koleo_group_size = {group_size}: a KoLeo group must hold whole ranks' batches of {B} images and "
                f"divide the global batch of {len(everyone)}"
            )
        ranks_per_group = size // B
        first = rank // ranks_per_group * size
        group = everyone[first : first + size]  # (S, D): this rank's group, its own rows included
        with torch.no_grad():
            dots = x @ group.t()  # (B, S) cosine similarities
            own = torch.arange(B, device=x.device)
            dots[own, own + rank % ranks_per_group * B] = -2.0  # never pick oneself (cosines are >= -1)
            nn_index = dots.topk(topk, dim=1).indices  # (B, k)
        distances = F.pairwise_distance(x.repeat_interleave(topk, 0), group[nn_index.flatten()], p=2, eps=eps)
        return -torch.log(distances + eps).mean()  # over the B k pairs


class KoLeoLoss(nn.Module):
    """Module form of `koleo_loss`."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: Tensor) -> Tensor:
        return koleo_loss(features, self.eps)


# --------------------------------------------------------------------------------------------------------------------
# Gram anchoring (DINOv3)
# --------------------------------------------------------------------------------------------------------------------


def gram_loss(student: Tensor, teacher: Tensor, *, img_level: bool = True, remove_neg: bool = False) -> Tensor:
    """Gram anchoring (Simeoni et al. 2025, DINOv3, section 4.2): the mean squared difference between the Gram
    matrices of the student's and the Gram teacher's L2-normalised patch features, as the release's `GramLoss`.

    With `img_level`, each image's N x N matrix of patch-to-patch cosine similarities is compared (B matrices);
    otherwise the patches of the whole batch are flattened and one (B N) x (B N) matrix is compared. With
    `remove_neg`, negative similarities are set to 0 in both matrices first (no gradient flows through them).
    Computed in float32 whatever the autocast state.

    Args:
        student: (B, N, D) patch features, or (P, D) selected patches when not `img_level`.
        teacher: the Gram teacher's features of the same patches, same shape (no gradient is needed).
        img_level: one Gram matrix per image (True) or one over the batch (False).
        remove_neg: clip negative similarities to 0 in both matrices.

    Returns:
        A scalar: the mean over every entry of the Gram matrices of the squared difference.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"gram_loss: student {tuple(student.shape)} != teacher {tuple(teacher.shape)}")
    if img_level and student.dim() != 3:
        raise ValueError(f"gram_loss: img_level needs (B, N, D) features, got {tuple(student.shape)}")
    if student.dim() not in (2, 3):
        raise ValueError(f"gram_loss: expected (B, N, D) or (P, D) features, got {tuple(student.shape)}")
    with torch.autocast(student.device.type, enabled=False):
        grams = []
        for x in (student, teacher):
            x = F.normalize(x.float(), dim=-1)  # cosine similarities, as released (`apply_norm`)
            if not img_level and x.dim() == 3:
                x = x.flatten(0, 1)  # (B N, D): one matrix over the batch
            g = x @ x.transpose(-1, -2)  # (B, N, N) or (B N, B N)
            grams.append(g.masked_fill(g < 0, 0.0) if remove_neg else g)
        return F.mse_loss(grams[0], grams[1])


class GramLoss(nn.Module):
    """Module form of `gram_loss`, its options bound."""

    def __init__(self, *, img_level: bool = True, remove_neg: bool = False) -> None:
        super().__init__()
        self.img_level = img_level
        self.remove_neg = remove_neg

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return gram_loss(student, teacher, img_level=self.img_level, remove_neg=self.remove_neg)
