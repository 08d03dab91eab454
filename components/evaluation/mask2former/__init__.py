"""The paper's headline segmentation protocol: a frozen DINOv2 backbone with ViT-Adapter and Mask2Former.

Modules, in forward order:
    deform_attn   multi-scale deformable attention (Deformable DETR) with `grid_sample`
    adapter       ViT-Adapter: spatial prior module, injectors and extractors around groups of frozen blocks
    head          Mask2Former: deformable pixel decoder, masked-attention transformer decoder, semantic inference
    criterion     Hungarian matching and the class, mask BCE and dice losses on sampled points
    protocol      training (crops, flips, AdamW, poly decay), sliding-window inference, the `mask2former` protocol
"""
