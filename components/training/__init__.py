"""DINOv2 pretraining: the meta-architecture, the DeepSpeed engine, the streaming loader, checkpoints and the loop.

The pieces and what each knows:

- `module.TrainModule`: *what is trained and what the loss is*. A plain torch module (no devices, no DeepSpeed)
  that computes its loss from a batch, names its optimised parameter groups, lists the (source, target) module
  pairs the engine keeps as exponential moving averages, and exports its deliverable weights. `meta_arch.SSLMetaArch`
  is the pretraining one (student, EMA teacher, DINO / iBOT / KoLeo); distillation plugs in its own (a frozen
  teacher and several students, each with an EMA copy) and reuses everything below unchanged.
- `engine.TrainEngine` (the only module that imports DeepSpeed): wraps any `TrainModule` in ZeRO stage 0-3,
  precision, gradient accumulation, clipping, activation checkpointing, the per-step schedules, the numerical guard
  and the EMA, and reads and writes a rank-independent ("consolidated") training state.
- `data`: the deterministic, rank-sharded stream of multi-crop batches over a curated manifest.
- `checkpoint`: atomic, pruned, resumable checkpoints of that state, and the model exports beside them.
- `loop.train`: the loop that ties them together, with metrics, progress and periodic kNN evaluation (`knn`).
- `plan`: what each phase of a training stage computes (networks, crops, global batch, scaled lr, schedule lengths
  in steps, what is frozen, where the weights come from), built once by pure functions of the config.
- `trainer.Trainer`: one phase from its plan (`resume_or_init`, `fit`, `save`, `export`) for any `TrainModule`;
  `components.stages.common.train_stage` runs a stage's phases in sequence inside the stage shell (MLflow, gate,
  curve).

Nothing here runs at import; DeepSpeed is imported when an engine is built.
"""
