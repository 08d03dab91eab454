"""Loss tests: each loss against a naive loop written here, Sinkhorn-Knopp marginals, degenerate inputs, the EMA
centre, the DINO head, and the cross-process reductions on two gloo processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components.model import (
    DINOHead,
    DINOLoss,
    KoLeoLoss,
    iBOTPatchLoss,
    koleo_loss,
    koleo_loss_distributed,
    sinkhorn_knopp,
)


def naive_ce(student_row, teacher_row, temp):
    """-sum_k t_k log softmax(s / temp)_k for one sample, with explicit loops."""
    logits = [float(v) / temp for v in student_row]
    top = max(logits)
    log_z = top + math.log(sum(math.exp(v - top) for v in logits))
    return -sum(float(t) * (v - log_z) for t, v in zip(teacher_row, logits, strict=True))


def naive_dino(student_global, student_local, teacher_global, temp=0.1):
    """The paper's DINO multi-crop loss: global crop g vs teacher crops g' != g, local crops vs every teacher crop."""
    G, B, _ = teacher_global.shape
    terms = []
    for s in range(G):
        for t in range(G):
            if s != t:
                terms.append(sum(naive_ce(student_global[s, b], teacher_global[t, b], temp) for b in range(B)) / B)
    for crop in student_local:
        for t in range(G):
            terms.append(sum(naive_ce(crop[b], teacher_global[t, b], temp) for b in range(B)) / B)
    return sum(terms) / len(terms)


def naive_sinkhorn(logits, temp, iters):
    """The release's single-process Sinkhorn-Knopp, step by step."""
    Q = torch.exp(logits.double() / temp).t()
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def test_dino_loss_matches_naive_loop():
    torch.manual_seed(0)
    G, L, B, K = 2, 3, 4, 7
    sg, sl = torch.randn(G, B, K), torch.randn(L, B, K)
    tg = torch.softmax(torch.randn(G, B, K) / 0.05, dim=-1)
    loss = DINOLoss(K)
    torch.testing.assert_close(loss(sg, sl, tg).item(), naive_dino(sg, sl, tg), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss(sg, None, tg).item(), naive_dino(sg, [], tg), rtol=1e-5, atol=1e-6)


def test_the_local_crop_weight_is_the_releases_reweighting():
    """DINOv3's `compute_losses`: w_global x mean over global pairs + w_local x local_weight x mean over local pairs,
    each share its count of pairs over all pairs."""
    torch.manual_seed(1)
    G, L, B, K = 2, 4, 3, 5
    sg, sl = torch.randn(G, B, K), torch.randn(L, B, K)
    tg = torch.softmax(torch.randn(G, B, K) / 0.05, dim=-1)
    n_global, n_local = G * (G - 1), L * G
    global_mean = naive_dino(sg, [], tg)
    local_mean = sum(sum(naive_ce(sl[c, b], tg[t, b], 0.1) for b in range(B)) / B for c in range(L) for t in range(G))
    local_mean /= n_local
    for w in (1.0, 0.5, 0.0):
        release = n_global / (n_global + n_local) * global_mean + n_local / (n_global + n_local) * w * local_mean
        ours = DINOLoss(K)(sg, sl, tg, local_weight=w).item()
        torch.testing.assert_close(ours, release, rtol=1e-5, atol=1e-6)
    assert DINOLoss(K)(sg, sl, tg, local_weight=0.5).item() < DINOLoss(K)(sg, sl, tg).item()


def test_dino_loss_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    G, L, B, K = 2, 4, 8, 512
    sg, sl = torch.randn(G, B, K) * 3, torch.randn(L, B, K) * 3
    tg = torch.softmax(torch.randn(G, B, K) / 0.05, dim=-1)
    loss = DINOLoss(K)
    reference = loss(sg, sl, tg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(sg, sl, tg)
        lsm = torch.log_softmax(sl / 0.1, dim=-1)
        in_bf16 = torch.einsum("tbk,lbk->", tg, lsm)  # what an autocast einsum would give
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, rtol=1e-6, atol=0)
    exact = torch.einsum("tbk,lbk->", tg.double(), lsm.double())
    assert in_bf16.dtype == torch.bfloat16 and abs(float(in_bf16) - float(exact)) > 1e-6 * abs(float(exact))


def test_dino_loss_gradient_only_through_student():
    sg = torch.randn(2, 3, 5, requires_grad=True)
    tg = torch.softmax(torch.randn(2, 3, 5), -1)
    DINOLoss(5)(sg, None, tg).backward()
    assert sg.grad is not None and torch.isfinite(sg.grad).all()


def cosine_logits(B, K, dim=16):
    """Teacher logits as the DINO head makes them: cosines between unit features and unit prototypes."""
    z = torch.nn.functional.normalize(torch.randn(B, dim), dim=-1)
    w = torch.nn.functional.normalize(torch.randn(K, dim), dim=-1)
    return z @ w.t()


def test_sinkhorn_marginals_and_naive_agreement():
    torch.manual_seed(0)
    B, K = 32, 8
    logits = cosine_logits(B, K)
    Q = sinkhorn_knopp(logits, teacher_temp=0.07, n_iterations=3)
    torch.testing.assert_close(Q.double(), naive_sinkhorn(logits, 0.07, 3), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(Q.sum(dim=1), torch.ones(B))  # each sample's targets form a distribution
    assert Q.dtype == torch.float32 and (Q >= 0).all()
    # the prototypes' marginals approach B / K (exactly, once converged)
    Q50 = sinkhorn_knopp(logits, teacher_temp=0.07, n_iterations=200)
    torch.testing.assert_close(Q50.sum(dim=0), torch.full((K,), B / K), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(Q50.sum(dim=1), torch.ones(B))


def test_sinkhorn_is_finite_at_low_temperature():
    logits = torch.tensor([[1.0, 0.2, 0.5], [0.9, 0.8, 0.1]])  # exp(1 / 0.01) overflows float32
    Q = sinkhorn_knopp(logits, teacher_temp=0.01)
    assert torch.isfinite(Q).all()
    torch.testing.assert_close(Q.sum(dim=1), torch.ones(2))


def test_softmax_centering_and_ema_centre():
    torch.manual_seed(0)
    loss = DINOLoss(6, center_momentum=0.9)
    t1, t2 = torch.randn(10, 6), torch.randn(4, 6)
    p = loss.softmax_center_teacher(t1, teacher_temp=0.04)
    torch.testing.assert_close(p, torch.softmax(t1 / 0.04, -1))  # centre starts at 0
    loss.update_center(t1)
    loss.update_center(t2)  # applies the first update, starts the second
    loss.apply_center_update()
    c1 = 0.1 * t1.mean(0)
    expected = 0.9 * c1 + 0.1 * t2.mean(0)
    torch.testing.assert_close(loss.center[0], expected)
    p = loss.softmax_center_teacher(t2, teacher_temp=0.07)
    torch.testing.assert_close(p, torch.softmax((t2 - expected) / 0.07, -1))
    loss.update_center(torch.empty(0, 6))  # no rows: the centre stays
    loss.apply_center_update()
    torch.testing.assert_close(loss.center[0], expected)


def naive_ibot(student, teacher, masks, temp=0.1):
    """Per image: mean over its masked patches of the cross-entropy; then the mean over all images."""
    B, N, _ = student.shape
    total = 0.0
    for b in range(B):
        idx = [n for n in range(N) if masks[b, n]]
        if idx:
            total += sum(naive_ce(student[b, n], teacher[b, n], temp) for n in idx) / len(idx)
    return total / B


def test_ibot_loss_matches_naive_loop_dense_and_masked():
    torch.manual_seed(0)
    B, N, K = 4, 6, 5
    s, t = torch.randn(B, N, K), torch.softmax(torch.randn(B, N, K) / 0.05, -1)
    masks = torch.rand(B, N) < 0.4
    masks[1] = False  # an image without masked patches
    masks[2, 0] = True
    loss = iBOTPatchLoss(K)
    expected = naive_ibot(s, t, masks)
    torch.testing.assert_close(loss(s, t, masks).item(), expected, rtol=1e-5, atol=1e-6)
    weights = (1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    masked = loss.forward_masked(s[masks], t[masks], weights, n_images=B)
    torch.testing.assert_close(masked.item(), expected, rtol=1e-5, atol=1e-6)


def test_ibot_without_masked_patches_is_zero_and_finite():
    loss = iBOTPatchLoss(5)
    s = torch.randn(3, 4, 5, requires_grad=True)
    value = loss(s, torch.softmax(torch.randn(3, 4, 5), -1), torch.zeros(3, 4, dtype=torch.bool))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(s.grad).all()
    empty = torch.zeros(0, 5, requires_grad=True)
    value = loss.forward_masked(empty, torch.zeros(0, 5), torch.zeros(0), n_images=3)
    value.backward()
    assert value.item() == 0.0
    Q = loss.sinkhorn_knopp_teacher(torch.zeros(0, 5), teacher_temp=0.07)  # no masked patch on this rank
    assert Q.shape == (0, 5)


def naive_koleo(x, eps=1e-8):
    x = [v / max(math.sqrt(sum(float(c) ** 2 for c in v)), eps) for v in x]
    total = 0.0
    for i, xi in enumerate(x):
        others = [j for j in range(len(x)) if j != i]
        best = max(others, key=lambda j: float(sum(a * b for a, b in zip(xi, x[j], strict=True))))
        dist_ = math.sqrt(sum((float(a) - float(b) + eps) ** 2 for a, b in zip(xi, x[best], strict=True)))
        total += -math.log(dist_ + eps)
    return total / len(x)


def test_koleo_matches_naive_loop():
    torch.manual_seed(0)
    x = torch.randn(9, 5)
    torch.testing.assert_close(koleo_loss(x).item(), naive_koleo(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(KoLeoLoss()(x), koleo_loss(x))


def test_koleo_with_identical_features_is_finite():
    x = torch.randn(4, 8)
    x[1] = x[0]
    x.requires_grad_(True)
    value = koleo_loss(x)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    same = torch.ones(3, 8, requires_grad=True)
    value = koleo_loss(same)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(same.grad).all()


def test_distributed_koleo_on_one_process_is_koleo_of_the_batch():
    torch.manual_seed(0)
    x = torch.randn(9, 5)
    torch.testing.assert_close(koleo_loss_distributed(x), koleo_loss(x), rtol=0, atol=0)
    torch.testing.assert_close(koleo_loss_distributed(x, topk=3).item(), naive_koleo_topk(x, 3), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dino.koleo_group_size = 4"):
        koleo_loss_distributed(x, group_size=4)


def naive_koleo_topk(x, k, eps=1e-8):
    """Minus the mean log distance from each normalised row to each of its k nearest other rows."""
    x = torch.nn.functional.normalize(x.double(), dim=-1, eps=eps)
    terms = []
    for i in range(len(x)):
        others = sorted((j for j in range(len(x)) if j != i), key=lambda j: -float(x[i] @ x[j]))[:k]
        terms += [-math.log(float((x[i] - x[j] + eps).norm()) + eps) for j in others]
    return sum(terms) / len(terms)


def test_dino_head_shapes_and_initial_unit_prototypes():
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=11, hidden_dim=32, bottleneck_dim=8)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert head(torch.randn(5, 16)).shape == (5, 11)  # CLS features (B, D)
    assert head(torch.randn(7, 16)).shape == (7, 11)  # masked patch tokens (M, D)
    x = torch.randn(3, 16)
    logits = head(x)
    assert logits.abs().max() <= 1.0 + 1e-6  # at initialisation (g = 1) the logits are cosine similarities
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.weight_v
    torch.testing.assert_close(logits, z @ (v / v.norm(dim=1, keepdim=True)).t())
    assert DINOHead(16, 4, nlayers=1, bottleneck_dim=8).mlp[0].in_features == 16


# --------------------------------------------------------------------------------------------------------------------
# Two processes (gloo): the reductions see the global batch
# --------------------------------------------------------------------------------------------------------------------


def _two_rank_worker(rank, world, init_file, logits, teacher, features, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        split = [slice(0, 5), slice(5, None)][rank]  # unequal shares: 5 and 7 rows
        q = sinkhorn_knopp(logits[split], teacher_temp=0.07, n_iterations=3)
        loss = iBOTPatchLoss(logits.shape[1])
        loss.update_center(teacher[split])
        loss.apply_center_update()
        out = {"q": q, "center": loss.center.clone()}
        B = len(features) // world  # the distributed KoLeo: equal shares
        for name, kwargs in (("koleo", {}), ("per_rank", {"group_size": B}), ("top2", {"topk": 2})):
            x = features[rank * B : (rank + 1) * B].clone().requires_grad_(True)
            value = koleo_loss_distributed(x, **kwargs)
            value.backward()
            out[name], out[f"{name}_grad"] = value.detach(), x.grad
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What two gloo processes computed, with the inputs they shared: (rank 0, rank 1, inputs)."""
    out = tmp_path_factory.mktemp("two_ranks")
    torch.manual_seed(0)
    inputs = {"logits": cosine_logits(12, 6), "teacher": torch.randn(12, 6), "features": torch.randn(12, 6)}
    # spawn, not fork: a forked worker would inherit any process group this pytest process already holds
    mp.start_processes(
        _two_rank_worker,
        args=(2, str(out / "init"), inputs["logits"], inputs["teacher"], inputs["features"], str(out)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    return (*(torch.load(out / f"rank{r}.pt") for r in (0, 1)), inputs)


def test_reductions_over_two_processes_match_one(two_ranks):
    r0, r1, inputs = two_ranks
    logits, teacher = inputs["logits"], inputs["teacher"]
    torch.testing.assert_close(torch.cat((r0["q"], r1["q"])), sinkhorn_knopp(logits, 0.07, 3), rtol=1e-5, atol=1e-7)
    single = iBOTPatchLoss(6)
    single.update_center(teacher)
    single.apply_center_update()
    torch.testing.assert_close(r0["center"], single.center)
    torch.testing.assert_close(r1["center"], single.center)
    assert r0["center"].abs().sum() > 0


def test_distributed_koleo_over_two_processes_is_koleo_of_the_gathered_batch(two_ranks):
    """The mean over ranks of the distributed KoLeo is the single-process KoLeo of the gathered batch, and so are its
    gradients (each rank's gradient holds its own rows' share of every rank's loss, so averaging over ranks, as the
    engines do with parameter gradients, gives the gathered batch's); groups of one rank's batch are per-rank KoLeo;
    two neighbours per image, the naive loop's."""
    r0, r1, inputs = two_ranks
    features = inputs["features"]
    x = features.clone().requires_grad_(True)
    single = koleo_loss(x)
    single.backward()
    torch.testing.assert_close((r0["koleo"] + r1["koleo"]) / 2, single.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cat((r0["koleo_grad"], r1["koleo_grad"])) / 2, x.grad, rtol=1e-5, atol=1e-7)
    for rank, result in enumerate((r0, r1)):
        own = features[rank * 6 : (rank + 1) * 6]
        torch.testing.assert_close(result["per_rank"], koleo_loss(own), rtol=1e-6, atol=0)
    assert not torch.allclose(r0["per_rank"] + r1["per_rank"], r0["koleo"] + r1["koleo"])  # the groups matter
    torch.testing.assert_close(float(r0["top2"] + r1["top2"]) / 2, naive_koleo_topk(features, 2), rtol=1e-5, atol=1e-6)


def test_a_group_of_one_process_reduces_nothing(tmp_path, monkeypatch):
    """DeepSpeed starts a process group even on one GPU: the losses' reductions are then skipped, not sent."""
    torch.manual_seed(0)
    logits, teacher = cosine_logits(12, 6), torch.randn(12, 6)
    expected_q = sinkhorn_knopp(logits, 0.07, 3)
    expected = iBOTPatchLoss(6)
    expected.update_center(teacher)
    expected.apply_center_update()
    # In-process stage tests may have left this process's group of one behind; otherwise one is started here.
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:

        def no_collectives(*args, **kwargs):
            raise AssertionError("a collective was called with one rank")

        monkeypatch.setattr(dist, "all_reduce", no_collectives)
        torch.testing.assert_close(sinkhorn_knopp(logits, 0.07, 3), expected_q)
        loss = iBOTPatchLoss(6)
        loss.update_center(teacher)
        loss.apply_center_update()
        torch.testing.assert_close(loss.center, expected.center)
    finally:
        monkeypatch.undo()
        if own_group:
            dist.destroy_process_group()
