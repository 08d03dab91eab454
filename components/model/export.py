"""ONNX export of a backbone with dynamic batch size and image size (the release never shipped one).

The graph takes `images` (B, 3, H, W) with H and W any multiples of the patch size and returns the normalised CLS
token (B, D), the patch tokens (B, H/p * W/p, D) and, for register models, the registers (B, R, D). The position
grid is resized inside the graph by the separable bicubic matrices of `vit.bicubic_resize_matrix`, which reproduce
PyTorch's kernels (and the release's 0.1 offset) for any size. A DINOv3 ConvNeXt exports the same two outputs, for
H and W any multiples of its stride 32 (patch tokens on the stride-32 grid, or on the pseudo-patch grid with
`resize_patch_tokens`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from components.model.adapter import _unwrap_convnext, _unwrap_model
from components.model.convnext import STRIDE, ConvNeXt
from components.model.vit import DinoVisionTransformer

_MAX_PATCHES_PER_SIDE = 1024  # 14 336 px at patch 14: a bound torch.export needs, not a practical limit


class _Features(nn.Module):
    """forward_features as a tuple of tensors, which an exporter can name."""

    def __init__(self, backbone: DinoVisionTransformer | ConvNeXt) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        f = self.backbone.forward_features(images)
        out = (f["x_norm_clstoken"], f["x_norm_patchtokens"])
        if self.backbone.num_register_tokens:
            out = out + (f["x_norm_regtokens"],)
        return out  # type: ignore[return-value]


def _unwrap_backbone(model: nn.Module) -> DinoVisionTransformer | ConvNeXt:
    """The ViT or ConvNeXt inside DDP / `torch.compile` wrappers."""
    try:
        return _unwrap_model(model)
    except TypeError:
        try:
            return _unwrap_convnext(model)
        except TypeError:
            raise TypeError(f"expected a ViT or ConvNeXt backbone, got {type(model).__name__}") from None


def output_names(backbone: nn.Module) -> list[str]:
    """Names of the exported graph's outputs, in order."""
    names = ["x_norm_clstoken", "x_norm_patchtokens"]
    return names + ["x_norm_regtokens"] if _unwrap_backbone(backbone).num_register_tokens else names


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
    backbone = _unwrap_backbone(model)
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
