"""A backbone as a servable MLflow model: images in, the CLS token and the mean of the patch tokens out.

    model = mlflow.pyfunc.load_model("models:/dinov2-backbone@champion")
    out = model.predict({"image": [open("cat.jpg", "rb").read(), rgb_array]})  # encoded bytes or HxWx3 uint8
    out["cls"], out["patch_mean"]                                              # (N, D) float32 each

    mlflow models serve -m models:/dinov2-backbone@champion --env-manager local -p 5001
    curl -X POST http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64 of a PNG or JPEG>"]]}}'

The input is a batch of images: a DataFrame (or a dict) with one column `image` whose values are encoded images (PNG,
JPEG, ... anything Pillow reads; base64 strings in a JSON request, as MLflow sends binary columns) or HxWx3 uint8 RGB
arrays, of any sizes. Each image goes through the evaluation preprocessing of its preset (bicubic resize of the shorter
side, centre crop, the preset's mean and std; `model_config` in the MLmodel file says which), then the backbone. The
output is the release's `x_norm_clstoken` as `cls` and the mean of `x_norm_patchtokens` as `patch_mean`, exactly what
`components.model` computes on the same preprocessed images.

A model's files: the backbone in the official layout (`artifacts/backbone/`: model.json, backbone.pth and
backbone.safetensors, read through components/exports.py), this package as code (`code/components/`), and
`serving_model.py`, the file MLflow runs to build the model (MLflow's models from code). The report stage logs one per
candidate backbone and registers the best (components/stages/report.py).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image

from components.exports import Export, copy_backbone, read_export
from components.tracking import PyfuncModel

BACKBONE_ARTIFACT = "backbone"
"""The model's artifact holding the backbone-only export."""
MODEL_CODE = Path(__file__).with_name("serving_model.py")
REQUIREMENTS = (
    "mlflow", "torch", "torchvision", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "safetensors", "tqdm",
)  # fmt: skip
"""What the model's code imports (pinned to this environment's versions in the model's requirements)."""
BATCH_SIZE = 32
"""Images per forward pass."""


def preprocessing(arch: str) -> dict[str, Any]:
    """The model's `model_config`: the evaluation preprocessing the preset's weights expect, and the device."""
    from components.model import get_preset

    preset = get_preset(arch)
    return {
        "arch": arch,
        "resize_size": preset.eval_resize,
        "image_size": preset.eval_crop,
        "mean": list(preset.mean),
        "std": list(preset.std),
        "device": "auto",
    }


def signature(embed_dim: int) -> Any:
    """Input: a binary column `image`; output: `cls` and `patch_mean`, (N, embed_dim) float32 each."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    outputs = [TensorSpec(np.dtype(np.float32), (-1, embed_dim), name) for name in ("cls", "patch_mean")]
    return ModelSignature(inputs=Schema([ColSpec(DataType.binary, "image")]), outputs=Schema(outputs))


def input_example() -> pd.DataFrame:
    """Two small PNGs (colour gradients): saved with the model, and as its serving request example."""
    ramp = np.linspace(0, 255, 32, dtype=np.uint8)
    images = [np.stack([ramp[None, :].repeat(32, 0), ramp[:, None].repeat(32, 1), np.full((32, 32), c, np.uint8)], -1)
              for c in (64, 192)]  # fmt: skip
    return pd.DataFrame({"image": [encode_png(a) for a in images]})


def encode_png(rgb: np.ndarray) -> bytes:
    """HxWx3 uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def servable_model(export: Export) -> Iterator[PyfuncModel]:
    """An export as a pyfunc model for `Tracker.log_model`: its backbone files (copied into a temporary folder that
    lives as long as the block), this package as code, the signature, input example, preprocessing and pinned
    requirements."""
    from components.model import backbone_config

    embed_dim = int(backbone_config(export.arch, **export.overrides).embed_dim)
    with tempfile.TemporaryDirectory(prefix="servable-") as tmp:
        backbone = copy_backbone(export, Path(tmp) / BACKBONE_ARTIFACT)
        yield PyfuncModel(
            model_code=MODEL_CODE,
            artifacts={BACKBONE_ARTIFACT: str(backbone)},
            code_paths=[str(Path(__file__).parent)],
            signature=signature(embed_dim),
            input_example=input_example(),
            model_config=preprocessing(export.arch),
            pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
        )


def decode_image(value: Any, index: int) -> Image.Image:
    """One value of the `image` column as an RGB image: encoded bytes (or their base64-decoded form) or an array.

    Raises:
        ValueError: Naming the row and what it holds, when it is neither.
    """
    if isinstance(value, bytes | bytearray):
        try:
            return Image.open(io.BytesIO(value)).convert("RGB")
        except OSError as err:
            raise ValueError(f"image {index}: not an image Pillow can decode ({len(value)} bytes): {err}") from None
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image {index}: expected encoded image bytes or an HxWx3 uint8 RGB array, "
                         f"got {type(value).__name__} {array.dtype} {array.shape}")  # fmt: skip
    return Image.fromarray(array)


def images_of(model_input: Any) -> list[Any]:
    """The `image` column's values, from a DataFrame or a dict (what MLflow passes after checking the signature)."""
    if isinstance(model_input, pd.DataFrame | Mapping) and "image" in model_input:
        return list(model_input["image"])
    raise ValueError(f"expected a DataFrame or dict with an `image` column, got {type(model_input).__name__}")


class BackboneFeatures(mlflow.pyfunc.PythonModel):
    """The pyfunc model: a backbone read from the model's `backbone` artifact, with its preset's preprocessing."""

    def load_context(self, context: Any) -> None:
        from components.model.augment import eval_transform

        cfg = context.model_config
        device = cfg.get("device", "auto")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu")
        if device not in ("auto", "cpu"):
            self.device = torch.device(device)
        self.backbone = read_export(context.artifacts[BACKBONE_ARTIFACT]).build_backbone().eval().to(self.device)
        self.transform = eval_transform(cfg["image_size"], cfg["resize_size"], cfg["mean"], cfg["std"])

    # No type hints on `predict`: MLflow would read them as a second signature, besides the one logged with the model.
    @torch.inference_mode()
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        images = [self.transform(decode_image(v, i)) for i, v in enumerate(images_of(model_input))]
        cls, patch_mean = [], []
        for start in range(0, len(images), BATCH_SIZE):
            x = torch.stack(images[start : start + BATCH_SIZE]).to(self.device)  # (B, 3, S, S)
            out = self.backbone.forward_features(x)
            cls.append(out["x_norm_clstoken"].float().cpu())  # (B, D)
            patch_mean.append(out["x_norm_patchtokens"].float().mean(dim=1).cpu())  # (B, N, D) -> (B, D)
        if not cls:
            raise ValueError("no images: the `image` column is empty")
        return {"cls": torch.cat(cls).numpy(), "patch_mean": torch.cat(patch_mean).numpy()}
