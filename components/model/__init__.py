"""The DINOv2 model core: backbones, heads, losses, masking, multi-crop, schedules, checkpoints and export.

from components.model import build_backbone, load_official_weights
model = load_official_weights(build_backbone("vit_small"), "dinov2_vits14_pretrain.pth")
features = model.forward_features(images)  # x_norm_clstoken (B, D), x_norm_patchtokens (B, N, D), ...
"""

from components.model.adapter import (
    CheckpointError,
    load_official_weights,
    normalize_state_dict,
    official_state_dict,
    read_state_dict,
    save_official_weights,
)
from components.model.augment import (
    MultiCropAugmentation,
    MultiCropCollate,
    augmentation_from_config,
    collate_from_config,
    eval_transform,
)
from components.model.export import export_onnx
from components.model.heads import DINOHead
from components.model.losses import (
    DINOLoss,
    KoLeoLoss,
    cross_entropy,
    iBOTPatchLoss,
    koleo_loss,
    koleo_loss_distributed,
    sinkhorn_knopp,
)
from components.model.masking import MaskingGenerator
from components.model.schedules import (
    CosineSchedule,
    TrainingSchedules,
    WarmupCosineSchedule,
    build_schedules,
    cosine_schedule,
    param_groups,
    warmup_cosine_decay,
)
from components.model.vit import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OFFICIAL_MODELS,
    PRESETS,
    DinoVisionTransformer,
    Preset,
    ViTConfig,
    backbone_config,
    backbone_from_config,
    build_backbone,
    build_official_backbone,
    get_preset,
    official_checkpoint_url,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFICIAL_MODELS",
    "PRESETS",
    "CheckpointError",
    "CosineSchedule",
    "DINOHead",
    "DINOLoss",
    "DinoVisionTransformer",
    "KoLeoLoss",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "MultiCropCollate",
    "Preset",
    "TrainingSchedules",
    "ViTConfig",
    "WarmupCosineSchedule",
    "augmentation_from_config",
    "backbone_config",
    "backbone_from_config",
    "build_backbone",
    "build_official_backbone",
    "build_schedules",
    "collate_from_config",
    "cosine_schedule",
    "cross_entropy",
    "eval_transform",
    "export_onnx",
    "get_preset",
    "iBOTPatchLoss",
    "koleo_loss",
    "koleo_loss_distributed",
    "load_official_weights",
    "normalize_state_dict",
    "official_checkpoint_url",
    "official_state_dict",
    "param_groups",
    "read_state_dict",
    "save_official_weights",
    "sinkhorn_knopp",
    "warmup_cosine_decay",
]
