"""The model core: DINOv2 and DINOv3 backbones, heads, losses, masking, multi-crop, schedules, checkpoints, export.

from components.model import build_backbone, build_official_backbone, load_official_weights
model = load_official_weights(build_backbone("vit_small"), "dinov2_vits14_pretrain.pth")
model = load_official_weights(build_official_backbone("dinov3_vits16"), "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
features = model.forward_features(images)  # x_norm_clstoken (B, D), x_norm_patchtokens (B, N, D), ...
"""

from components.model.adapter import (
    CheckpointError,
    checkpoint_family,
    checkpoint_geometry,
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
from components.model.convnext import ConvNeXt, ConvNeXtConfig
from components.model.export import export_onnx
from components.model.families import (
    FAMILIES,
    OFFICIAL_MODELS,
    PRESETS,
    backbone_config,
    backbone_from_config,
    build_backbone,
    build_official_backbone,
    family_of,
    get_preset,
    official_checkpoint_url,
)
from components.model.heads import DINOHead
from components.model.losses import (
    DINOLoss,
    GramLoss,
    KoLeoLoss,
    cross_entropy,
    gram_loss,
    iBOTPatchLoss,
    koleo_loss,
    koleo_loss_distributed,
    sinkhorn_knopp,
)
from components.model.masking import MaskingGenerator
from components.model.rope import RopePositionEmbedding
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
    DinoVisionTransformer,
    Preset,
    ViTConfig,
)
from components.model.vit_dinov3 import DinoV3VisionTransformer, DinoV3ViTConfig, official_file_name

__all__ = [
    "ConvNeXt",
    "ConvNeXtConfig",
    "FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFICIAL_MODELS",
    "PRESETS",
    "CheckpointError",
    "CosineSchedule",
    "DINOHead",
    "DINOLoss",
    "DinoV3ViTConfig",
    "DinoV3VisionTransformer",
    "DinoVisionTransformer",
    "GramLoss",
    "KoLeoLoss",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "MultiCropCollate",
    "Preset",
    "RopePositionEmbedding",
    "TrainingSchedules",
    "ViTConfig",
    "WarmupCosineSchedule",
    "augmentation_from_config",
    "backbone_config",
    "backbone_from_config",
    "build_backbone",
    "build_official_backbone",
    "build_schedules",
    "checkpoint_family",
    "checkpoint_geometry",
    "collate_from_config",
    "cosine_schedule",
    "cross_entropy",
    "eval_transform",
    "export_onnx",
    "family_of",
    "get_preset",
    "gram_loss",
    "iBOTPatchLoss",
    "koleo_loss",
    "koleo_loss_distributed",
    "load_official_weights",
    "normalize_state_dict",
    "official_checkpoint_url",
    "official_file_name",
    "official_state_dict",
    "param_groups",
    "read_state_dict",
    "save_official_weights",
    "sinkhorn_knopp",
    "warmup_cosine_decay",
]
