"""What a finished pretraining run does when its stage runs again: it is reused only for the same configuration, the
same curated set, the same starting weights and the same code; otherwise it trains afresh (DVC re-runs a stage when
any of these changed, and a reused run would re-export the old weights under the new inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from components.config import load_config, validate_config
from components.training import trainer as trainer_module

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _config():
    raw = load_config(ROOT / "params.yaml").model_dump(mode="json")
    raw["model"].update(arch="vit_test")
    raw["dino"].update(head_n_prototypes=32, head_hidden_dim=16, head_bottleneck_dim=8)
    raw["crops"].update(global_crops_size=28, local_crops_size=14, local_crops_number=1)
    raw["optim"].update(epochs=2, epoch_length=STEPS // 2, warmup_epochs=1)
    raw["teacher"].update(warmup_teacher_temp_epochs=1)
    raw["train"].update(batch_size_per_gpu=4, num_workers=0, checkpoint_period=2, log_period=1, keep_last=2,
                        device="cpu", cpu_threads=1, knn_eval_period=0)  # fmt: skip
    raw["highres"].update(iterations=2, batch_size_per_gpu=2, global_crops_size=42, local_crops_size=14)
    return validate_config(raw)


def _pretrain(cfg, curated: Path, work: Path, stage: str = "pretrain") -> dict:
    from components.stages.pretrain import run_pretrain, run_pretrain_highres

    paths = dict(curated=str(curated), checkpoints=str(work / stage / "ck"), out=str(work / stage / "out"),
                 metrics=str(work / stage / "metrics.json"), curve=str(work / stage / "curve.csv"))  # fmt: skip
    if stage == "pretrain":
        run_pretrain(cfg, **paths)
    else:
        run_pretrain_highres(cfg, pretrained=str(work / "pretrain" / "out"), **paths)
    finals = (work / stage / "ck").glob(f"*/*/step_{_steps(cfg, stage):08d}")  # <phase>/<fingerprint>/step_N
    final = max(finals, key=lambda p: (p / "state.pt").stat().st_mtime_ns)
    return {
        "meta": json.loads((final / "meta.json").read_text()),
        "mtime": (final / "state.pt").stat().st_mtime_ns,
        "weights": torch.load(work / stage / "out" / "backbone.pth", map_location="cpu", weights_only=True),
    }


def _steps(cfg, stage: str) -> int:
    return STEPS if stage == "pretrain" else cfg.highres.iterations


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_is_redone_when_its_data_weights_or_code_change(
    curated, tmp_path, monkeypatch, caplog, in_process_training
):
    monkeypatch.setenv("DINOV2_TRACKING", "off")
    cfg = _config()
    first = _pretrain(cfg, curated, tmp_path)
    again = _pretrain(cfg, curated, tmp_path)  # nothing changed: the finished run is re-exported, not redone
    assert again["mtime"] == first["mtime"] and _same(again["weights"], first["weights"])
    high = _pretrain(cfg, curated, tmp_path, "pretrain_highres")

    # Other curated data (the same images in another order): another fingerprint, a new run.
    uris = pd.read_parquet(curated / "manifest.parquet")["uri"].tolist()
    other = tmp_path / "curated_other"
    other.mkdir()
    pd.DataFrame({"uri": uris[::-1]}).to_parquet(other / "manifest.parquet")
    moved = _pretrain(cfg, other, tmp_path)
    assert moved["meta"]["fingerprint"] != first["meta"]["fingerprint"]
    assert moved["mtime"] != first["mtime"] and not _same(moved["weights"], first["weights"])

    # The high-resolution phase starts from the new pretrain export: its finished run is not reused either.
    high2 = _pretrain(cfg, curated, tmp_path, "pretrain_highres")
    assert high2["meta"]["fingerprint"] != high["meta"]["fingerprint"]

    # Other code, same fingerprint: the finished run is set aside and trained afresh (its checkpoints replaced).
    before = _pretrain(cfg, other, tmp_path)
    assert before["mtime"] == moved["mtime"]  # reused while the code is the same
    monkeypatch.setattr(trainer_module, "code_digest", lambda: "0" * 16)
    with caplog.at_level("INFO", logger="dinov2.training.trainer"):
        redone = _pretrain(cfg, other, tmp_path)
    assert "finished this run with other code" in caplog.text
    assert redone["meta"]["code"] == "0" * 16 and redone["meta"]["fingerprint"] == moved["meta"]["fingerprint"]
    assert redone["mtime"] != moved["mtime"]
    assert _same(redone["weights"], moved["weights"])  # the same inputs and code paths: the same weights
    folder = tmp_path / "pretrain" / "ck" / "pretrain" / moved["meta"]["fingerprint"]
    metas = [json.loads((p / "meta.json").read_text()) for p in sorted(folder.iterdir())]
    assert {m["code"] for m in metas} == {"0" * 16}  # the old code's checkpoints are gone


def test_an_unfinished_run_resumes_across_a_code_change(curated, tmp_path, monkeypatch, caplog, in_process_training):
    monkeypatch.setenv("DINOV2_TRACKING", "off")
    cfg = _config()
    first = _pretrain(cfg, curated, tmp_path)
    folder = tmp_path / "pretrain" / "ck" / "pretrain" / first["meta"]["fingerprint"]
    (folder / f"step_{STEPS:08d}").rename(folder / "crashed")
    monkeypatch.setattr(trainer_module, "code_digest", lambda: "1" * 16)
    with caplog.at_level("INFO", logger="dinov2.training.trainer"):
        done = _pretrain(cfg, curated, tmp_path)
    assert "resuming with this code" in caplog.text and "resuming from" in caplog.text
    assert done["meta"]["code"] == "1" * 16
