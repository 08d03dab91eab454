"""Gradient clipping of each student module on its own, as both releases' training loops clip
(`for k, v in student.items(): clip_grad_norm_(v.parameters(), clip_grad)`), against a hand computation.

`TwoModules` (clip_scenario.py) has a module whose gradient norm is far above `optim.clip_grad` and one far below:
the first is scaled to the threshold, the second is left as it is (one norm over both would shrink it too). On ZeRO 0
in this process the gradients the fused AdamW receives are read in its step; on ZeRO 1, 2 and 3 with 2 CPU ranks
(torchrun, gloo), where each rank holds a partition of the averaged gradients, they are gathered with DeepSpeed's
`safe_get_full_grad` just before its step. Each module's norm is logged as `grad_norm.<module>` beside `grad_norm`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from components.training.checkpoint import LoopState
from components.training.engine import TrainEngine, clip_sets
from components.training.loop import LoopSettings, train
from tests.training.clip_scenario import CLIP, VALUES, TwoModules, batches, clipped, reference_gradients, settings
from tests.training.test_distributed import PYTHON, ROOT, subprocess_env


def test_each_module_is_clipped_on_its_own_on_zero0(in_process_training):
    torch.manual_seed(0)
    module, reference = TwoModules(), TwoModules()
    reference.load_state_dict(module.state_dict())
    expected, norms = clipped(reference_gradients(reference, world=1), CLIP)
    assert norms["big"] > 10 * CLIP and norms["small"] < CLIP / 10
    engine = TrainEngine(module, settings(stage=0))
    seen: dict[str, torch.Tensor] = {}
    step = engine._adamw.step

    def capture_then_step(*args, **kwargs):  # the gradients the optimizer steps with
        seen.update({n: p.grad.clone() for n, p in engine.module.named_parameters()})
        return step(*args, **kwargs)

    engine._adamw.step = capture_then_step
    out = engine.train_step(batches(0), VALUES)
    assert not out.skipped and seen.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(seen[name], grad, rtol=1e-6, atol=1e-9, msg=name)
    unclipped = reference_gradients(reference, world=1)
    for name in ("small.weight", "small.bias"):  # not shrunk by the big module's norm
        torch.testing.assert_close(seen[name], unclipped[name], rtol=1e-6, atol=0)
    big = torch.cat([seen[n].flatten() for n in ("big.weight", "big.bias")])
    assert float(big.norm()) == pytest.approx(CLIP, rel=1e-5)
    assert out.module_norms == pytest.approx(norms, rel=1e-6)
    assert out.grad_norm == pytest.approx((norms["big"] ** 2 + norms["small"] ** 2) ** 0.5, rel=1e-6)


def test_each_modules_norm_is_logged(in_process_training):
    torch.manual_seed(0)
    engine = TrainEngine(TwoModules(), settings(stage=0))
    rows = []
    stream = (b for _ in range(2) for b in batches(0))
    schedules = SimpleNamespace(at=lambda step: VALUES)
    loop = LoopSettings(total_steps=1, log_period=1, checkpoint_period=1, max_nonfinite_steps=2)
    train(engine, stream, schedules, LoopState(), loop, save_checkpoint=lambda state: None,
          log_metrics=lambda row, step: rows.append(row))  # fmt: skip
    (row,) = rows
    assert row["grad_norm.big"] > CLIP > row["grad_norm.small"] > 0
    assert row["grad_norm"] == pytest.approx((row["grad_norm.big"] ** 2 + row["grad_norm.small"] ** 2) ** 0.5)


def test_every_trained_parameter_belongs_to_one_clipping_module():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    trained = [a.weight, a.bias, b.weight]
    sets = clip_sets({"a": a, "b": b, "frozen": nn.Linear(1, 1)}, trained, ["a.weight", "a.bias", "b.weight"])
    assert list(sets) == ["a", "b"] and sets["b"] == [b.weight]  # modules without trained parameters are left out
    with pytest.raises(ValueError, match=r"in no clipping module \(clip_modules\): \['b.weight'\]"):
        clip_sets({"a": a}, trained, ["a.weight", "a.bias", "b.weight"])
    with pytest.raises(ValueError, match="belongs to clipping modules 'a' and 'both'"):
        clip_sets({"a": a, "both": nn.ModuleList([a, b])}, trained, ["a.weight", "a.bias", "b.weight"])


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("clip")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("clip_scenario.py")), "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, env=subprocess_env(), timeout=300, cwd=ROOT)
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_each_module_is_clipped_on_its_own_under_zero_on_two_ranks(zero_runs, stage):
    """Each module's squared norm is summed over the ranks' partitions before its factor is applied."""
    assert zero_runs["world"] == 2
    r = zero_runs["stages"][stage]
    assert r["big_clipped"] and r["small_unclipped"] and not r["skipped"] and r["moved"]
    assert r["max_error"] <= 1e-6 * r["max_value"] + 1e-9  # the optimizer's gradients are the hand computation's
    assert r["module_norms"] == pytest.approx(r["expected_norms"], rel=1e-5)
    expected_total = sum(v * v for v in r["expected_norms"].values()) ** 0.5
    assert r["grad_norm"] == pytest.approx(expected_total, rel=1e-5)
