"""Projection heads of DINOv2 pretraining: the DINO head, used for the CLS token and (tied or separate) for iBOT.

Whether iBOT shares the DINO head (`ibot.separate_head: false`) is the pretraining stage's choice: it either calls
the same `DINOHead` on the masked patch tokens or builds a second one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> K prototypes (Caron et al. 2021; Oquab et al. 2023).

    The MLP has `nlayers` linear layers (hidden 2048, GELU between them) ending at the bottleneck (256 or 384). The
    last layer is a weight-normalised linear map to the K prototypes whose norm is fixed to 1: each prototype row is
    L2-normalised in the forward pass, which is `weight_norm` with g = 1, kept explicit so that the parameter is a
    plain tensor (`last_layer.weight`) that ZeRO partitions and `torch.compile` traces. The parameter name
    `last_layer` is what the parameter-group builder looks for to freeze the prototypes in the first epoch.

    Input: CLS features (B, D) or masked patch tokens (M, D), or any (..., D). Output: logits (..., K).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out, bias=mlp_bias))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)  # (K, bottleneck) prototypes
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        self.init_weights()

    def init_weights(self) -> None:
        """Truncated normal (0.02) for the MLP, zero biases; prototypes keep PyTorch's default (then normalised)."""
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)  # (..., bottleneck)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        prototypes = F.normalize(self.last_layer.weight, dim=-1, p=2, eps=eps)  # (K, bottleneck), unit rows
        return F.linear(x, prototypes)  # (..., K)
