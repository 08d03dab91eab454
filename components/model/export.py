"""ONNX export of a backbone with dynamic batch size and image size (the releases never shipped one).

The graph takes `images` (B, 3, H, W) with H and W any multiples of the patch size and returns the normalised CLS
token (B, D), the patch tokens (B, H/p * W/p, D) and, for models with registers (DINOv2) or storage tokens (DINOv3),
those (B, R, D), under the name of the family's features. DINOv2's position grid is resized inside the graph by the
separable bicubic matrices of `vit.bicubic_resize_matrix`, which reproduce PyTorch's kernels (and the release's 0.1
offset) for any size; DINOv3's RoPE tables are computed inside the graph from the symbolic grid size.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from components.model.adapter import _unwrap_model
from components.model.convnext import STRIDE, ConvNeXt
from components.model.vit import DinoVisionTransformer
from components.model.vit_dinov3 import DinoV3VisionTransformer

_MAX_PATCHES_PER_SIDE = 1024  # 14 336 px at patch 14: a bound torch.export needs, not a practical limit
EXTRA_TOKENS = {DinoVisionTransformer: "x_norm_regtokens", DinoV3VisionTransformer: "x_storage_tokens"}
"""Each family's features key of its registers / storage tokens."""


def output_names(backbone: nn.Module) -> list[str]:
    """Names of the exported graph's outputs, in order (`forward_features` keys)."""
    backbone = _unwrap_model(backbone)
    names = ["x_norm_clstoken", "x_norm_patchtokens"]
    return names + [EXTRA_TOKENS[type(backbone)]] if backbone.num_register_tokens else names


class _Features(nn.Module):
    """forward_features as a tuple of tensors, which an exporter can name."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.names = output_names(backbone)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        f = self.backbone.forward_features(images)
        return tuple(f[name] for name in self.names)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    example_size: tuple[int, int] = (224, 224),
    example_batch: int = 2,
    opset_version: int | None = None,
) -> Path:
    """Exports the backbone to ONNX with dynamic batch and image size (float32, inference mode).

    Args:
        model: the backbone (possibly wrapped); a float32 CPU copy is exported in eval mode.
        path: the `.onnx` file to write; weights above 2 GB go to a `.data` file beside it.
        example_size: (H, W) of the tracing input, multiples of the patch size (the graph accepts any).
        example_batch: batch of the tracing input; at least 2 (a size-1 example would be specialised).
        opset_version: ONNX opset; None takes the exporter's default.

    Returns:
        The path written. Input `images` (B, 3, H, W); outputs as `output_names(model)`.
    """
    backbone = _unwrap_model(model)
    # A ConvNeXt's input side is a multiple of its stride (32), so that every stage's grid is exact.
    p = STRIDE if isinstance(backbone, ConvNeXt) else backbone.patch_size
    if example_size[0] % p or example_size[1] % p or example_batch < 2:
        raise ValueError(f"example_size must be multiples of {p} and example_batch >= 2")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Features(copy.deepcopy(backbone)).eval().to("cpu", torch.float32)  # the caller's model is untouched
    Dim = torch.export.Dim
    rows = Dim("patch_rows", min=1, max=_MAX_PATCHES_PER_SIDE)
    cols = Dim("patch_cols", min=1, max=_MAX_PATCHES_PER_SIDE)
    dynamic = {"images": {0: Dim("batch", min=1, max=1 << 16), 2: p * rows, 3: p * cols}}
    example = torch.randn(example_batch, backbone.cfg.in_chans, *example_size)
    n_bytes = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=output_names(backbone),
            dynamic_shapes=dynamic,
            opset_version=opset_version,
            verbose=False,
        )
    program.save(str(path), external_data=n_bytes > 1.8e9)
    return path
