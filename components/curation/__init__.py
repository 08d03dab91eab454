"""Curation (DINOv2 section 3, appendix A.3-A.4): deduplicate the pool, remove evaluation leakage, retrieve and
balance. `search` is the one faiss module; `curate.curate` is the pure core the `curate` stage wraps."""
