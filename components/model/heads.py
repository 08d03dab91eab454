"""Projection heads of DINOv2 pretraining: the DINO head, used for the CLS token and (tied or separate) for iBOT.

Whether iBOT shares the DINO head (`ibot.separate_head: false`) is the pretraining stage's choice: it either calls
the same `DINOHead` on the masked patch tokens or builds a second one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormPrototypes(nn.Module):
    """The K prototypes: the release's `weight_norm(nn.Linear(bottleneck, K, bias=False))`, as plain tensors.

    logits_k = x . (g_k v_k / ||v_k||) for each prototype k: `weight_v` (K, bottleneck) holds the directions and
    `weight_g` (K, 1) their norms, initialised to 1 and trained (DINOv2 leaves `weight_g` trainable, where DINO v1
    froze it), so each prototype's effective temperature can move. The names and shapes are those of the release's
    state dict (`last_layer.weight_g`, `last_layer.weight_v`); two plain parameters, computed into the weight in
    the forward pass, are what ZeRO partitions and `torch.compile` traces (PyTorch's weight-norm hooks are neither).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))  # (K, 1), registered first, as weight_norm does
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))  # (K, bottleneck)
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default, the release's v

    @property
    def weight(self) -> Tensor:
        """g v / ||v||, row by row: (K, bottleneck), without an epsilon, as `torch._weight_norm` computes it."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)  # (..., K)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> K weight-normalised prototypes (Caron et al. 2021; Oquab et al. 2023).

    The MLP has `nlayers` linear layers (hidden 2048, GELU between them) ending at the bottleneck (256 or 384); the
    last layer is `WeightNormPrototypes`. Module names are the release's (`mlp.0`, `mlp.2`, `mlp.4`, `last_layer`),
    so its state dict is the release's head layout; the name `last_layer` is also what the parameter-group builder
    looks for to freeze the prototypes (directions and norms) in the first epoch.

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
        self.last_layer = WeightNormPrototypes(bottleneck_dim, out_dim)
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        self.init_weights()

    def init_weights(self) -> None:
        """Truncated normal (0.02) for the MLP, zero biases; the prototypes keep their own initialisation."""
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)  # (..., bottleneck)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)  # (..., K)
