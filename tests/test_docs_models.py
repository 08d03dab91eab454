"""docs/models.md against the code: its table of released backbones lists every Torch Hub name the model registry
builds, with the preset, parameter count, patch size, registers / storage tokens and released file names the code
has (backbones built on the meta device: no weights, no memory)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from components.model import OFFICIAL_MODELS, build_official_backbone, official_checkpoint_url
from components.model.vit_dinov3 import RELEASED_FILES

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def documented_rows() -> dict[str, list[str]]:
    """Hub name -> the cells of its row in the released-backbones table."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 6 and cells[0].strip("`") in OFFICIAL_MODELS:
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_models_page_lists_every_released_backbone_as_the_code_builds_it() -> None:
    rows = documented_rows()
    assert set(rows) == set(OFFICIAL_MODELS)
    for name, (_, preset, params, patch, tokens, files) in rows.items():
        arch, _ = OFFICIAL_MODELS[name]
        assert preset.split()[0].strip("`") == arch, name
        with torch.device("meta"):
            backbone = build_official_backbone(name)
        count = sum(p.numel() for p in backbone.parameters())
        assert params == f"{count / 1e6:.1f}M", (name, params, count)
        assert int(patch.split()[0]) == backbone.cfg.patch_size, name
        extra = getattr(backbone.cfg, "num_register_tokens", getattr(backbone.cfg, "n_storage_tokens", None))
        assert tokens == ("none" if extra is None else str(extra)), name
        named = re.findall(r"`([\w.-]+\.pth)`", files)
        want = [official_checkpoint_url(name).rsplit("/", 1)[-1], *list(RELEASED_FILES.get(name, {}).values())[1:]]
        assert named == want, (name, named, want)
