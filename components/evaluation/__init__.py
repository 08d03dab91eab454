"""Frozen-feature evaluation of DINOv2 backbones: the paper's benchmarks with the standard metric definitions.

Run: `python -m components evaluate` (every model on every task) then `python -m components report`.

Modules, from the bottom up:
    metrics       pure metric functions (kNN vote, top-k, AP / Recall@k, mIoU, Eigen depth metrics, mCE)
    corruptions   the 15 ImageNet-C corruptions at 5 severities, in numpy / PIL / scipy (no downloads)
    datasets      loaders for the evaluation folder formats (classification, segmentation, depth, retrieval)
    features      frozen feature extraction through the backbone API (CLS of the last blocks, patch maps)
    knn, linear, retrieval, segmentation, depth    one protocol each, on in-memory arrays
    models        discovery of the backbones to evaluate (`model.json` descriptors) and their loading
    runner        every task for one model, and the robustness normalisation across models
    report        comparison tables, figures, the quality gate and the MLflow Model Registry entry
    benchmarks    the paper's benchmarks read from their publishers' layouts: one reader per dataset family and a
                  registry (reader + protocol); `python -m components benchmark`, `evaluate.benchmarks`
    items         pictures inside a publisher's file (CIFAR pickles, NYU's .mat) and query crops, read in place
    alexnet_c     AlexNet's published ImageNet-C errors, the normaliser of the benchmark's mCE
    outputs       strict JSON and safe clearing of the stages' output folders

docs/evaluation.md gives the metric definitions and the dataset folder formats.
"""
