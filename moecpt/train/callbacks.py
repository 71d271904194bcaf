"""Plug-in points of the training loop (OLMo-core style: one concern per callback, the loop stays short).

A :class:`Callback` sees the run start, every metrics record, every step's result, every evaluation, every saved
checkpoint and the run's end; the trainer calls a :class:`CallbackList` and never branches on what is plugged in. Progress display
(a tqdm bar on a terminal, plain lines elsewhere) and the metric sinks (``metrics.jsonl``, TensorBoard, W&B) are
callbacks. Only rank 0 of a job gets any (ranks > 0 run with an empty list).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm


@dataclass
class StepResult:
    """What one optimizer step produced (``record`` is its ``metrics.jsonl`` train record, or None when the step
    is not logged; ``skipped`` when a non-finite step was skipped)."""

    step: int  # 1-based: the number of optimizer steps done
    end_step: int
    tokens: int
    loss: float
    lr: float
    step_time_s: float
    record: dict[str, Any] | None = None
    skipped: bool = False


@dataclass
class RunInfo:
    """Static facts of a run, given to :meth:`Callback.on_run_start`."""

    mode: str  # "pretrain" | "cpt"
    name: str
    out_dir: Path
    start_step: int
    end_step: int
    tokens_per_step: int
    config: dict[str, Any] = field(default_factory=dict)  # the resolved recipe (after presets and --set)
    config_line: str = ""  # its keys that differ from the defaults, one line (Trainer.compact_config)


class Callback(Protocol):
    """The hooks; every one is optional (see :class:`CallbackBase`)."""

    def on_run_start(self, info: RunInfo) -> None: ...
    def on_record(self, record: dict[str, Any]) -> None: ...
    def on_step_end(self, result: StepResult) -> None: ...
    def on_eval(self, step: int, losses: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_run_end(self, summary: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class CallbackBase:
    """No-op implementations of every hook; subclass and override what you need."""

    def on_run_start(self, info: RunInfo) -> None:
        pass

    def on_record(self, record: dict[str, Any]) -> None:
        """Every ``metrics.jsonl`` record (train, validation, events), as written."""

    def on_step_end(self, result: StepResult) -> None:
        pass

    def on_eval(self, step: int, losses: dict[str, float]) -> None:
        """After each evaluation: held-out cross-entropy (nats) per source."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_run_end(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Always called, also when the run fails."""


class CallbackList(CallbackBase):
    """Calls each hook on every callback in order; :meth:`close` reaches all of them even if one fails."""

    def __init__(self, callbacks: list[Any]):
        self.callbacks = list(callbacks)

    def on_run_start(self, info: RunInfo) -> None:
        for cb in self.callbacks:
            cb.on_run_start(info)

    def on_record(self, record: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_record(record)

    def on_step_end(self, result: StepResult) -> None:
        for cb in self.callbacks:
            cb.on_step_end(result)

    def on_eval(self, step: int, losses: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_eval(step, losses)

    def on_checkpoint(self, step: int, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(step, path)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_run_end(summary)

    def close(self) -> None:
        errors = []
        for cb in self.callbacks:
            try:
                cb.close()
            except Exception as exc:  # noqa: BLE001 - close the rest, then report the first
                errors.append(exc)
        if errors:
            raise errors[0]


class ProgressKind(StrEnum):
    """How a run shows progress: ``auto`` = a bar on a terminal, plain lines otherwise (SLURM, nohup)."""

    AUTO = "auto"
    BAR = "bar"
    LINES = "lines"
    NONE = "none"

    def resolve(self, stream: Any = None) -> "ProgressKind":
        if self is not ProgressKind.AUTO:
            return self
        stream = stream if stream is not None else sys.stderr
        return ProgressKind.BAR if getattr(stream, "isatty", lambda: False)() else ProgressKind.LINES


def start_line(info: RunInfo, params: int | None = None) -> str:
    """The lines a run prints first: what runs, how long, where the resolved config is kept (``RUN/config.json``)
    and, when known, its keys that differ from the defaults."""
    size = f", {params / 1e6:,.2f}M parameters" if params else ""
    tokens = info.tokens_per_step * (info.end_step - info.start_step)
    resume = f" (resuming at step {info.start_step})" if info.start_step else ""
    line = (f"moecpt: {info.mode} {info.name!r}{size}: steps {info.start_step}->{info.end_step}{resume}, "
            f"{tokens:,} tokens -> {info.out_dir} (resolved recipe: {info.out_dir / 'config.json'})")
    return line + (f"\nmoecpt: config: {info.config_line}" if info.config_line else "")


class ProgressBar(CallbackBase):
    """A tqdm bar on stderr (loss and LR in its postfix)."""

    def __init__(self, params: int | None = None):
        self.params = params
        self.bar = None

    def on_run_start(self, info: RunInfo) -> None:
        print(start_line(info, self.params), file=sys.stderr)
        self.bar = tqdm(total=info.end_step, initial=info.start_step, desc=f"{info.mode} {info.name}", unit="step",
                        leave=False)

    def on_step_end(self, result: StepResult) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.2e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LogLines(CallbackBase):
    """One plain line every ``every`` steps (and at the last step) on ``stream``: what a cluster log can read.

    ``step 120/600 (20%)  loss 4.8123  lr 2.91e-03  tokens/s 41,230  elapsed 0:01:02  eta 0:04:08``; the rate and
    ETA come from the steps of this process (a resumed run does not count the steps it skipped).

    Args:
        every: steps between lines; None = about 20 lines per run.
    """

    def __init__(self, every: int | None = None, stream: Any = None, params: int | None = None):
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.params = params
        self._t0 = 0.0
        self._start = 0
        self._tokens_per_step = 0

    def on_run_start(self, info: RunInfo) -> None:
        print(start_line(info, self.params), file=self.stream, flush=True)
        self.every = self.every or max(1, (info.end_step - info.start_step) // 20)
        self._t0, self._start, self._tokens_per_step = time.perf_counter(), info.start_step, info.tokens_per_step

    def on_step_end(self, result: StepResult) -> None:
        if result.step % self.every and result.step != result.end_step:
            return
        elapsed = time.perf_counter() - self._t0
        done = result.step - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (result.end_step - result.step) / rate if rate > 0 else 0.0
        skipped = "  (skipped: non-finite)" if result.skipped else ""
        print(f"step {result.step}/{result.end_step} ({100 * result.step / result.end_step:.0f}%)  "
              f"loss {result.loss:.4f}  lr {result.lr:.2e}  tokens/s {rate * self._tokens_per_step:,.0f}  "
              f"elapsed {_hms(elapsed)}  eta {_hms(eta)}{skipped}", file=self.stream, flush=True)

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step % self.every == 0:
            print(f"saved {path}", file=self.stream, flush=True)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_callbacks(kind: ProgressKind, params: int | None = None, every: int | None = None) -> list[Any]:
    """The progress callback for ``kind`` (resolved against stderr), as a list (empty for ``none``)."""
    kind = kind.resolve()
    if kind is ProgressKind.BAR:
        return [ProgressBar(params)]
    if kind is ProgressKind.LINES:
        return [LogLines(every, params=params)]
    return []
