"""A training session on one model directory: model, optimizer, guarded step, checkpoint sync.

The session is the one place that composes the pieces below it: the optimizer
(``livetrain.optim``), the context-frozen step (``livetrain.train``) and checkpoint
sync (``livetrain.checkpoint``). Offline ``livetrain train`` runs it in-process on an
ordinary Hugging Face model; the training worker of ``livetrain serve`` runs it on a
model whose parameters are views of the served weights.

Invariants:

* one session per directory: it opens the directory for writing, which takes its lock
  (see :mod:`livetrain.checkpoint.lock`);
* a step and a sync never overlap (one lock), so a sync never sees half a step;
* optimizer state lives in ``DIR/.livetrain/optimizer.pt`` (`optimizer_state`), written
  atomically at every sync, every ``save_every`` applied steps and on close, and is
  restored on open;
* when the weights outlive the session (a shared copy in ``live_state_dir``), each step
  is guarded by a :class:`~livetrain.weights.step_undo.StepUndo` there, and the optimizer
  state is also written there after every applied step: a worker killed mid-step is
  replaced by one that undoes the torn step and resumes from the last applied one;
* every applied step, sync and rollback is appended to ``DIR/.livetrain/metrics.jsonl``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

import torch

from livetrain.checkpoint import ModelDirectory, SyncScheduler
from livetrain.checkpoint.fileio import WriteStats, write_file_durably
from livetrain.checkpoint.lock import STATE_DIRNAME
from livetrain.optim import Apollo, apollo_mini, apollo_param_groups
from livetrain.options import TrainerOptions
from livetrain.session import optimizer_state
from livetrain.session.probe import ProbeCheck, ProbeGuard
from livetrain.train.context_cache import ContextCache
from livetrain.train.data import Example
from livetrain.train.step import Refusal, StepOptions, StepResult, continuation_logprobs, train_step
from livetrain.weights.step_undo import StepUndo, last_kept_state, take_undo_report, undo_torn_step


@dataclasses.dataclass
class StepReport:
    """What one training request did to the weights."""

    loss: float | None
    tokens: int
    lr: float  # the step's learning rate, after warmup
    grad_norm: float | None
    update_norm: float | None
    applied: bool
    reason: str | None
    seconds: float
    cache_hits: int
    weights_version: int
    # Hugging Face names of the tensors the step wrote, kept or undone (an undone step's
    # values may have been served meanwhile): what the serving side must refresh.
    changed_tensors: list[str]
    dry_run: bool
    probe_drift: float | None = None  # change of the probe's mean log-prob (nats/token)
    request_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainingSession:
    """Owns a model directory while training it. Use :meth:`open`; close when done."""

    def __init__(self, model_dir: Path, model: torch.nn.Module, directory: ModelDirectory,
                 options: TrainerOptions, scheduled_sync: bool, save_every: int, probe: ProbeGuard | None,
                 live_state_dir: Path | None = None) -> None:
        self.model_dir = model_dir
        self.model = model
        self.directory = directory
        self.options = options
        self.optimizer_kind = options.optimizer
        self.train_modules = options.train_modules
        self.lr = options.learning_rate
        self.save_every = save_every
        self.probe = None if probe is None else ProbeCheck(probe)
        self.state_dir = model_dir / STATE_DIRNAME
        self.optimizer_path = self.state_dir / "optimizer.pt"
        self.live_state_dir = live_state_dir
        self.metrics_path = self.state_dir / "metrics.jsonl"
        self._mutex = threading.RLock()  # a step, a sync and a rollback never overlap
        self.optimizer = build_optimizer(model, self.optimizer_kind, self.train_modules, self.lr)
        names = {id(p): n for n, p in model.named_parameters()}
        self.trainable = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        self.trainable_parameters = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        self._state_owner = optimizer_state.StateOwner(self.optimizer_kind, self.train_modules, tuple(self.trainable))
        params = self._named_params()
        # A step torn by the death of the previous process on these weights is undone first
        # (here, or already by vLLM when it reused the copy: either way it is reported).
        self.torn_step = None
        if live_state_dir is not None:
            undo_torn_step(live_state_dir, params)
            self.torn_step = take_undo_report(live_state_dir)
        self.undo = StepUndo({n: params[n] for n in self.trainable}, live_state_dir)
        self.context_cache = ContextCache()
        self.steps_applied = 0
        self.steps_refused = 0
        self.weights_version = 0
        self.dirty = False
        self._state_unsaved = False
        self.recent: deque[dict[str, Any]] = deque(maxlen=16)
        self._recent_lock = threading.Lock()  # status() reads it from another thread
        self.optimizer_state = self._restore_optimizer_state()
        self.last_generation = directory.latest
        if self.torn_step is not None:
            self._log("torn_step_undone", **self.torn_step)
        self.scheduler = SyncScheduler(self._sync, interval_s=options.sync_interval_s) if scheduled_sync else None
        self._closed = False

    @classmethod
    def open(cls, model_dir: str | os.PathLike, options: TrainerOptions = TrainerOptions(), *,
             model: torch.nn.Module | None = None, scheduled_sync: bool = False, probe: ProbeGuard | None = None,
             live_state_dir: str | os.PathLike | None = None, keep_generations: int = 20, save_every: int = 50,
             holder: str = "livetrain train") -> "TrainingSession":
        """Lock ``model_dir``, recover an interrupted sync, load the model, restore state.

        ``options``: the optimizer, what it trains, the learning rate and the sync
        interval. ``model``: the model to train (the served weights' Hugging Face
        skeleton when serving); loaded from ``model_dir`` with its stored dtype when
        omitted. ``scheduled_sync``: sync ``options.sync_interval_s`` after the last
        applied step (False: only on :meth:`sync` and :meth:`close`). ``probe``: undo
        steps that move a fixed text's log-probs too far (off when None).
        ``live_state_dir``: where ``model``'s weights live when they outlive this process
        (the shared copy's directory): a torn step found there is undone, and each step
        is guarded there (see the module notes). Raises ``DirectoryInUse`` if another
        process holds the directory.
        """
        model_dir = Path(model_dir)
        directory = ModelDirectory.open(model_dir, keep_generations=keep_generations, holder=holder)
        try:
            if model is None:
                model = load_model(model_dir)
            return cls(model_dir, model, directory, options, scheduled_sync, save_every, probe,
                       None if live_state_dir is None else Path(live_state_dir))
        except BaseException:
            directory.close()
            raise

    # ---- training -------------------------------------------------------------------

    def train(self, examples: Sequence[Example], options: StepOptions | None = None, *,
              request_id: str | None = None) -> StepReport:
        """One optimizer step on a batch of examples (gradients accumulated).

        Snapshot (optimizer state; the weights in the step undo) -> step -> guards ->
        commit or restore -> record. Raises ``InvalidExampleError`` (before any
        computation) for an example the step cannot train on.
        """
        options = options or StepOptions()
        with self._mutex:
            self._check_open()
            options = dataclasses.replace(
                options, lr=(options.lr or self.lr) * self.options.warmup_factor(self._optimizer_steps()))
            if options.dry_run:
                result = train_step(self.model, self.optimizer, list(examples), options,
                                    context_cache=self.context_cache)
                return self._record(result, options, wrote=False, probe_drift=None, request_id=request_id)
            if self.probe is not None:
                self.probe.before_step(self.model)
            state_before = copy.deepcopy(self.optimizer.state_dict())
            self.undo.begin(self.weights_version + 1)
            try:
                # Every update is measured against the step undo's copies before it can be
                # served: a non-finite one is undone by the step itself.
                result = train_step(self.model, self.optimizer, list(examples), options,
                                    context_cache=self.context_cache, before=self.undo.saved)
                wrote = result.applied or result.refusal is Refusal.NON_FINITE_UPDATE
                probe_drift = (self.probe.check(self.model, result)
                               if self.probe is not None and result.applied else None)
            except BaseException:
                self._restore(state_before)
                self.undo.end()
                raise
            if result.applied:
                self.steps_applied += 1
                self.weights_version += 1
                self.dirty = True
                self._state_unsaved = True
                # Writing the state beside the weights commits the step there.
                self.undo.end(self._state_bytes() if self.live_state_dir else None)
            else:
                if wrote:
                    self._restore(state_before)
                self.steps_refused += 1
                self.undo.end()
            report = self._record(result, options, wrote, probe_drift, request_id)
            if result.applied:
                if self.scheduler is not None:
                    self.scheduler.mark_dirty()
                if self.steps_applied % self.save_every == 0:
                    self.save_optimizer_state()
        return report

    def _optimizer_steps(self) -> int:
        """Steps the optimizer state has taken: 0 when fresh (a start without saved state,
        a rollback), and never counting an undone step (its state is restored)."""
        return max((int(state.get("step", 0)) for state in self.optimizer.state.values()), default=0)

    def _restore(self, state_before: dict[str, Any]) -> None:
        """Undo a step: the trained weights from the step undo's copies, the optimizer state
        (its moments may have advanced, or become non-finite) from before it."""
        self.undo.restore()
        self.optimizer.load_state_dict(state_before)

    def _record(self, result: StepResult, options: StepOptions, wrote: bool, probe_drift: float | None,
                request_id: str | None) -> StepReport:
        """The step's report, kept in ``recent`` and (unless a dry run) the metrics log."""
        report = StepReport(
            loss=_finite_or_none(result.loss), tokens=int(result.tokens), lr=options.lr,
            grad_norm=_finite_or_none(result.grad_norm), update_norm=_finite_or_none(result.update_norm), applied=result.applied, reason=result.reason,
            seconds=float(result.seconds), cache_hits=int(result.cache_hits), weights_version=self.weights_version,
            changed_tensors=list(self.trainable) if wrote else [], dry_run=options.dry_run,
            probe_drift=_finite_or_none(probe_drift), request_id=request_id)
        summary = {k: v for k, v in report.to_dict().items() if k != "changed_tensors"}
        with self._recent_lock:
            self.recent.append(summary)
        if not options.dry_run:
            self._log("step", loss_kind=options.loss, **summary)
        return report

    def logprobs(self, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> list[float]:
        """Per-token log-probs of the continuation under the live weights: [T_cont]."""
        with self._mutex:
            self._check_open()
            values = continuation_logprobs(self.model, list(context_ids), list(continuation_ids))
        return values.float().tolist()

    # ---- checkpoint ---------------------------------------------------------------------

    def sync(self) -> dict[str, Any]:
        """Write the trained tensors back into the directory now (a new generation if
        anything changed)."""
        return self.scheduler.sync_now() if self.scheduler is not None else self._sync()

    def _sync(self) -> dict[str, Any]:
        with self._mutex:
            self._check_open()
            params = self._named_params()
            result = self.directory.sync({name: params[name].detach() for name in self.trainable})
            self.dirty = False
            self.last_generation = result.generation
            self.save_optimizer_state()
            fields = {"generation": result.generation, "bytes_written": result.bytes_written,
                      "model_bytes": result.model_bytes, "blocks_changed": result.blocks_changed,
                      "tensors_touched": len(result.tensors_touched), "seconds": round(result.seconds, 4)}
            self._log("sync", **fields)
            return fields

    def generations(self) -> list[dict[str, Any]]:
        """The kept generations, oldest first, and whether each can be rolled back to."""
        reachable = set(self.directory.reachable())
        listed = {g.generation: {"generation": g.generation, "time": g.time, "seconds": g.seconds,
                                 "bytes_written": g.bytes_written, "blocks_changed": g.blocks_changed,
                                 "tensors_touched": len(g.tensors), "rollback_available": g.generation in reachable}
                  for g in self.directory.generations()}
        for g in reachable - set(listed):  # generation 0: the files as they were before any sync
            listed[g] = {"generation": g, "time": None, "rollback_available": True}
        return [listed[g] for g in sorted(listed)]

    def rollback(self, to: int) -> dict[str, Any]:
        """Restore generation ``to`` in the files and in the live weights.

        Unsynced changes are synced first (so they are a generation too). The
        optimizer state is reset: its moments describe the abandoned trajectory.
        """
        with self._mutex:
            self._check_open()
            self._sync()
            restored = self.directory.rollback(to)
            live = dict(self.model.state_dict(keep_vars=True))
            changed = []
            with torch.no_grad():
                for name, tensor in restored.items():
                    if name in live:
                        live[name].copy_(tensor.to(live[name].dtype))
                        changed.append(name)
            self.context_cache.clear()
            if self.probe is not None:
                self.probe.forget()
            self.optimizer = build_optimizer(self.model, self.optimizer_kind, self.train_modules, self.lr)
            self.optimizer_state = "reset by rollback"
            self.save_optimizer_state()
            self.weights_version += 1
            self.last_generation = to
            self.dirty = False
            self._log("rollback", generation=to, restored_tensors=len(changed))
            return {"generation": to, "changed_tensors": changed,
                    "weights_version": self.weights_version, "optimizer_state": "reset"}

    # ---- state --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A snapshot; safe to call while a step runs (reads counters only)."""
        with self._recent_lock:
            recent = list(self.recent)
        return {
            "model_dir": str(self.model_dir), "optimizer": self.optimizer_kind,
            "optimizer_state": self.optimizer_state, "train_modules": self.train_modules,
            "trainable_tensors": len(self.trainable),
            "trainable_parameters": self.trainable_parameters,
            "lr": self.lr, "steps_applied": self.steps_applied, "steps_refused": self.steps_refused,
            "weights_version": self.weights_version, "dirty_since_sync": self.dirty,
            "last_generation": self.last_generation, "recent": recent,
            "torn_step_undone": self.torn_step,
            "last_sync_error": (None if self.scheduler is None or self.scheduler.last_error is None
                                else str(self.scheduler.last_error)),
        }

    def save_optimizer_state(self) -> None:
        """Atomically replace ``optimizer.pt`` (checkpoint sync's durable whole-file write);
        also the live copy beside the weights, when they outlive the session."""
        with self._mutex:
            state = self._state_bytes()
            write_file_durably(self.optimizer_path, state, "metadata", WriteStats())
            self.undo.keep_state(self.weights_version, state)
            self._state_unsaved = False

    def _state_bytes(self) -> bytes:
        return self._state_owner.serialize(self.optimizer, self.steps_applied, self.weights_version)

    def close(self) -> None:
        """Stop the scheduler, sync unsynced changes, save state, release the directory."""
        if self._closed:
            return
        try:
            if self.scheduler is not None:
                self.scheduler.close()
            if self.dirty:
                self._sync()
            elif self._state_unsaved:
                self.save_optimizer_state()
        finally:
            self._closed = True
            self.directory.close()  # releases the directory's lock

    def __enter__(self) -> "TrainingSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------

    def _named_params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the training session is closed")

    def _restore_optimizer_state(self) -> str:
        """Load the newest saved state that fits: the live one (after the last applied
        step) when it is at least as new as the directory's (saved at the last sync)."""
        live = last_kept_state(self.live_state_dir) if self.live_state_dir is not None else None
        saved = [optimizer_state.load(live)] if live is not None else []
        if self.optimizer_path.exists():
            saved.append(optimizer_state.load(self.optimizer_path.read_bytes()))
        newest, description = self._state_owner.newest(saved)
        if newest is not None:
            self.optimizer.load_state_dict(newest["state_dict"])
            self.steps_applied = int(newest["steps_applied"])
            self.weights_version = int(newest["weights_version"])
        return description

    def _log(self, event: str, **fields: Any) -> None:
        record = {"time": round(time.time(), 3), "event": event, **fields}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def load_model(model_dir: Path) -> torch.nn.Module:
    """An ordinary Hugging Face causal LM from ``model_dir``, in its stored dtype."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    return model.eval()


def build_optimizer(model: torch.nn.Module, kind: str, train_modules: str,
                    lr: float) -> torch.optim.Optimizer:
    """APOLLO-Mini, APOLLO or AdamW over the decoder matrices matching ``train_modules``.

    Everything else (norms, biases, embeddings) is frozen. AdamW is APOLLO's full-rank
    path, so it too rounds bf16 weights stochastically.
    """
    groups = apollo_param_groups(model, train_modules, other="frozen", embeddings="frozen")
    if kind == "apollo-mini":
        return apollo_mini(groups, lr=lr)
    if kind == "apollo":
        return Apollo(groups, lr=lr)
    return Apollo(groups, lr=lr, rank=None)


def _finite_or_none(value: float | torch.Tensor | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
