"""The training loop: schedules, guarded steps, metrics, progress, checkpoints and periodic kNN evaluation.

It knows nothing of what is trained (the `TrainModule` inside the engine) nor of DeepSpeed (the engine): each
iteration takes `grad_accum_steps` micro-batches from the stream, reads the schedules at the step, lets the engine
run one guarded optimizer step, and every `log_period` steps reports the mean over ranks of every loss term with
lr, weight decay, momentum, teacher temperature, the gradient norm (total and per clipped module:
`grad_norm.<module>`), images/s and memory. Between logging and checkpoint
steps the host never waits for the device. A skipped (non-finite) step is counted on the device and settled at the
next logging or checkpoint step; `max_nonfinite_steps` of them in a row stop the run with `NonFiniteError` there,
before any checkpoint is written, so the newest checkpoint on disk is the last good one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import Tensor
from tqdm import tqdm

from components.log import get_logger
from components.training.checkpoint import LoopState
from components.training.engine import TrainEngine, all_reduce_mean

log = get_logger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm."""


@dataclass(frozen=True)
class LoopSettings:
    total_steps: int
    log_period: int
    checkpoint_period: int
    max_nonfinite_steps: int
    desc: str = "train"


@dataclass
class LoopResult:
    state: LoopState
    history: list[dict[str, float]] = field(default_factory=list)
    """One row per logged, applied step (what the curve CSV and the training-metrics gate read)."""
    last_checkpoint: Path | None = None
    stopped: str | None = None
    """Why the run stopped before its last step (an early stop), or None."""


def memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's resident memory on the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def train(
    engine: TrainEngine,
    batches: Iterator[Mapping[str, Any]],
    schedules: Any,
    state: LoopState,
    settings: LoopSettings,
    *,
    save_checkpoint: Callable[[LoopState], Path | None],
    log_metrics: Callable[[dict[str, float], int], None],
    monitors: Sequence[tuple[int, Callable[[], dict[str, float]]]] = (),
    stop: Callable[[dict[str, float]], str | None] | None = None,
    history: list[dict[str, float]] | None = None,
    on_row: Callable[[dict[str, float]], None] | None = None,
) -> LoopResult:
    """Runs steps `state.step` .. `settings.total_steps - 1`, mutating `state`.

    Args:
        engine: the engine holding the module.
        batches: this rank's endless micro-batch stream, positioned at `state.samples_seen`.
        schedules: `components.model.TrainingSchedules` (anything with `at(step) -> dict`).
        state: where the run is (fresh or restored from a checkpoint).
        settings: lengths and periods.
        save_checkpoint: collective; writes a checkpoint (and exports) for `state`, returns its path on rank 0.
        log_metrics: called on every rank with (metrics, step); the caller logs on rank 0.
        monitors: (period, collective function) pairs whose metrics join the logged row every `period` steps and at
            the last (the kNN accuracy, the backbone's drift from its start); periods are multiples of the log
            period's steps they fall on (a monitor runs on logging steps only).
        stop: given a logged row, a reason to stop now (an early stop), or None; the run then checkpoints and ends.
        history: rows logged before a resume (appended to in place, so that a checkpoint can save it).
        on_row: called with each row added to the history, as it is added (the curve file written as the run goes).
    """
    result = LoopResult(state=state, history=history if history is not None else [])
    accum = engine.settings.grad_accum_steps
    bar = tqdm(
        total=settings.total_steps, initial=state.step, desc=settings.desc, unit="it", disable=engine.rank != 0,
        dynamic_ncols=True, mininterval=1.0,
    )  # fmt: skip
    window_start, window_steps, failures = time.perf_counter(), 0, 0
    skips = SkipCounter(engine.device, state)
    while state.step < settings.total_steps:
        micro = [next(batches) for _ in range(accum)]
        failures += sum(int(b.get("decode_failures", 0)) for b in micro)
        values = schedules.at(state.step)
        out = engine.train_step(micro, values)
        state.step += 1
        state.samples_seen += engine.global_batch_size
        window_steps += 1
        skips.add(out.skipped_t)  # on the device: the host learns of skipped steps when it logs or checkpoints
        bar.update(1)
        last = state.step == settings.total_steps
        logging = state.step % settings.log_period == 0 or last
        saving = state.step % settings.checkpoint_period == 0 or last
        if not (logging or saving):
            continue
        skipped = skips.settle(state, settings.max_nonfinite_steps)  # raises before any checkpoint is written
        if logging:
            elapsed = time.perf_counter() - window_start
            row = _metrics(engine, out, values, state, failures, window_steps * engine.global_batch_size / elapsed)
            failures, window_steps, window_start = 0, 0, time.perf_counter()
            for period, monitor in monitors:
                if state.step % period == 0 or last:
                    row.update(monitor())
            log_metrics(row, state.step)
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            if not skipped:
                result.history.append({"step": state.step, **row})
                if on_row is not None:
                    on_row(result.history[-1])
            result.stopped = stop(row) if stop is not None and not last else None
        if (saving and not skipped) or last or result.stopped:
            result.last_checkpoint = save_checkpoint(state)  # never right after a skipped step, unless the last
        if result.stopped:
            log.warning("stopping at step %d of %d: %s", state.step, settings.total_steps, result.stopped)
            break
    bar.close()
    return result


class SkipCounter:
    """Skipped (non-finite) steps counted on the device, settled into the loop state when the host looks.

    Args:
        device: where the engine's step outputs live.
        state: the loop state whose `nonfinite_in_a_row` the count continues (a resumed run).
    """

    def __init__(self, device: torch.device, state: LoopState) -> None:
        self.in_a_row = torch.full((), float(state.nonfinite_in_a_row), device=device)
        self.longest = self.in_a_row.clone()  # the longest run of skipped steps since the last settle
        self.total = torch.zeros((), device=device)
        self.last = torch.zeros((), dtype=torch.bool, device=device)

    def add(self, skipped: Tensor) -> None:
        skipped = skipped.to(self.total.device)
        s = skipped.float()
        self.in_a_row = (self.in_a_row + 1) * s  # 0 after a good step
        self.longest = torch.maximum(self.longest, self.in_a_row)
        self.total += s
        self.last = skipped

    def settle(self, state: LoopState, max_in_a_row: int) -> bool:
        """Adds the skipped steps to `state` (one host synchronisation) and returns whether the newest step was
        skipped.

        Raises:
            NonFiniteError: `max_in_a_row` or more consecutive steps were skipped since the last settle.
        """
        in_a_row, longest, total, last = (float(x) for x in (self.in_a_row, self.longest, self.total, self.last))
        self.longest, self.total = self.in_a_row.clone(), torch.zeros_like(self.total)
        state.nonfinite_in_a_row, state.skipped_steps = int(in_a_row), state.skipped_steps + int(total)
        if total:
            log.warning(
                "%d optimizer step(s) up to step %d skipped: non-finite loss or gradient norm (%d in a row now, "
                "%d in total)", total, state.step, in_a_row, state.skipped_steps,
            )  # fmt: skip
        if longest >= max_in_a_row:
            raise NonFiniteError(
                f"{int(longest)} consecutive optimizer steps had a non-finite loss or gradient norm (by step "
                f"{state.step}; train.max_nonfinite_steps = {max_in_a_row}); no weights were updated by them and the "
                "newest checkpoint on disk is the last good one"
            )
        return bool(last)


def _metrics(
    engine: TrainEngine, out: Any, values: Mapping[str, float], state: LoopState, failures: int, images_per_s: float
) -> dict[str, float]:
    """The logged row: loss terms averaged over ranks, schedules, gradient norm, throughput, memory, counters."""
    names = sorted(out.terms)
    packed = torch.stack([out.terms[k].float() for k in names] + [torch.tensor(float(failures), device=engine.device)])
    packed = all_reduce_mean(packed.to(engine.device)).cpu()
    row = {k: float(v) for k, v in zip(names, packed[:-1], strict=True)}
    state.decode_failures += round(float(packed[-1]) * engine.world_size)
    row.update({k: float(v) for k, v in values.items()})
    norms = {f"grad_norm.{k}": v for k, v in out.module_norms.items()}  # before clipping; synchronises (logging step)
    row.update({k: v if math.isfinite(v) else float("nan") for k, v in norms.items()})
    row.update(
        grad_norm=out.grad_norm if math.isfinite(out.grad_norm) else float("nan"),  # synchronises: a logging step
        images_per_s=images_per_s,
        memory_gib=memory_gib(engine.device),
        skipped_steps=float(state.skipped_steps),
        decode_failures=float(state.decode_failures),
        samples_seen=float(state.samples_seen),
    )
    return row
