"""A training session on one model directory: model, optimizer, step, checkpoint sync.

The session is the one place that composes the pieces below it: the optimizer
(``livetrain.optim``), the context-frozen step (``livetrain.train``) and checkpoint
sync (``livetrain.checkpoint``). Offline ``livetrain train`` runs it in-process on an
ordinary Hugging Face model; the training worker of ``livetrain serve`` runs it on a
model whose parameters are views of the served weights.

Invariants:

* one session per directory: it opens the directory for writing, which takes its lock
  (see :mod:`livetrain.checkpoint.lock`);
* a step and a sync never overlap (one lock), so a sync never sees half a step;
* optimizer state lives in ``DIR/.livetrain/optimizer.pt``, written atomically (temp
  file + rename) at every sync, every ``save_every`` applied steps and on close, and is
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
import io
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
from livetrain.optim import Apollo, apollo_mini, apollo_param_groups
from livetrain.train.context_cache import ContextCache
from livetrain.train.data import Example
from livetrain.train.step import StepOptions, StepResult, continuation_logprobs, train_step
from livetrain.weights.step_undo import StepUndo, last_kept_state, take_undo_report, undo_torn_step
from livetrain.checkpoint.lock import STATE_DIRNAME

# Context-frozen training's natural target is W_q (what the continuation looks for in
# the frozen context); k, v and o come with it because vLLM refreshes q|k|v as one
# packed parameter anyway and o_proj lets a step write into the residual stream.
# Together they are ~20 % of a small Llama's bytes, so checkpoint syncs stay small.
# A regex searched in module names (and, unanchored, in tensor names alike).
DEFAULT_TRAIN_MODULES = r"self_attn\.(q|k|v|o)_proj"
OPTIMIZERS = ("apollo-mini", "apollo", "adamw")
# APOLLO scales its update to AdamW's size (alpha = sqrt(k / r)), so one lr fits all three.
DEFAULT_LR = 1e-4
STATE_FORMAT = 1
PROBE_TEXT = ("The river flows past the old mill and into the valley, where farmers grow wheat "
              "and barley. In winter the water freezes near the banks.")


@dataclasses.dataclass
class StepReport:
    """What one training request did to the weights."""

    loss: float | None
    tokens: int
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


@dataclasses.dataclass(frozen=True)
class ProbeGuard:
    """Undo a step that moves a fixed probe text's log-probs too far.

    ``max_drift``: the most the probe's mean per-token log-prob may change in one step,
    in nats (0.5 by default: far above what a teaching step moves ordinary text, far
    below what a destructive one does). A refused step's tensors are restored from
    copies taken before it (the session's ``StepUndo``), and its optimizer state too.
    """

    context_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    max_drift: float = 0.5

    @classmethod
    def from_text(cls, tokenizer: Any, text: str = PROBE_TEXT, max_drift: float = 0.5) -> "ProbeGuard":
        ids = tuple(tokenizer(text)["input_ids"])
        return cls(ids[:4], ids[4:], max_drift)


class TrainingSession:
    """Owns a model directory while training it. Use :meth:`open`; close when done."""

    def __init__(self, model_dir: Path, model: torch.nn.Module, directory: ModelDirectory,
                 optimizer_kind: str, train_modules: str, lr: float,
                 sync_interval_s: float | None, save_every: int, probe: ProbeGuard | None,
                 live_state_dir: Path | None = None) -> None:
        self.model_dir = model_dir
        self.model = model
        self.directory = directory
        self.optimizer_kind = optimizer_kind
        self.train_modules = train_modules
        self.lr = lr
        self.save_every = save_every
        self.probe = probe
        self._probe_logp: float | None = None  # the probe's mean log-prob under the live weights
        self.state_dir = model_dir / STATE_DIRNAME
        self.optimizer_path = self.state_dir / "optimizer.pt"
        self.live_state_dir = live_state_dir
        self.metrics_path = self.state_dir / "metrics.jsonl"
        self._mutex = threading.RLock()  # a step, a sync and a rollback never overlap
        self.optimizer = build_optimizer(model, optimizer_kind, train_modules, lr)
        names = {id(p): n for n, p in model.named_parameters()}
        self.trainable = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        self.trainable_parameters = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
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
        self.scheduler = (SyncScheduler(self._sync, interval_s=sync_interval_s)
                          if sync_interval_s is not None else None)
        self._closed = False

    @classmethod
    def open(cls, model_dir: str | os.PathLike, *, optimizer: str = "apollo-mini",
             train_modules: str = DEFAULT_TRAIN_MODULES, model: torch.nn.Module | None = None,
             lr: float | None = None, sync_interval_s: float | None = None,
             keep_generations: int = 20, save_every: int = 50, probe: ProbeGuard | None = None,
             live_state_dir: str | os.PathLike | None = None,
             holder: str = "livetrain train") -> "TrainingSession":
        """Lock ``model_dir``, recover an interrupted sync, load the model, restore state.

        ``model``: the model to train (the served weights' Hugging Face skeleton when
        serving); loaded from ``model_dir`` with its stored dtype when omitted.
        ``sync_interval_s``: sync this long after the last applied step (None: only on
        :meth:`sync` and :meth:`close`). ``probe``: undo steps that move a fixed text's
        log-probs too far (off when None). ``live_state_dir``: where ``model``'s weights
        live when they outlive this process (the shared copy's directory): a torn step
        found there is undone, and each step is guarded there (see the module notes).
        Raises ``DirectoryInUse`` if another process holds the directory.
        """
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        model_dir = Path(model_dir)
        directory = ModelDirectory.open(model_dir, keep_generations=keep_generations, holder=holder)
        try:
            if model is None:
                model = load_model(model_dir)
            return cls(model_dir, model, directory, optimizer, train_modules,
                       DEFAULT_LR if lr is None else lr, sync_interval_s, save_every, probe,
                       None if live_state_dir is None else Path(live_state_dir))
        except BaseException:
            directory.close()
            raise

    # ---- training -------------------------------------------------------------------

    def train(self, examples: Sequence[Example], options: StepOptions | None = None, *,
              request_id: str | None = None) -> StepReport:
        """One optimizer step on a batch of examples (gradients accumulated).

        Raises ``InvalidExampleError`` (before any computation) for an example the
        step cannot train on.
        """
        # Every update is measured against the step undo's copies before it can be served:
        # a non-finite one is undone by the step, and the norm goes into the report.
        options = options or StepOptions()
        dry_run = options.dry_run
        with self._mutex:
            self._check_open()
            if self.probe is not None and not dry_run and self._probe_logp is None:
                self._probe_logp = self._probe_mean_logp()
            # A refused or failed step restores the weights and, since the moments may have
            # advanced (or become non-finite), the optimizer state from before it.
            state_before = None if dry_run else copy.deepcopy(self.optimizer.state_dict())
            if not dry_run:
                self.undo.begin(self.weights_version + 1)
            try:
                result = train_step(self.model, self.optimizer, list(examples), options,
                                    context_cache=self.context_cache,
                                    before=None if dry_run else self.undo.saved)
            except BaseException:
                if not dry_run:
                    self.undo.restore()
                    self.optimizer.load_state_dict(state_before)
                    self.undo.end()
                raise
            if not result.applied and state_before is not None and self.optimizer.state \
                    and (result.reason or "").startswith("non-finite update"):
                self.optimizer.load_state_dict(state_before)
            probe_drift = None
            wrote = result.applied or (result.reason or "").startswith("non-finite update")
            if result.applied and self.probe is not None:
                probe_drift = self._check_probe(result, state_before)
            changed = list(self.trainable) if wrote else []
            if result.applied:
                self.steps_applied += 1
                self.weights_version += 1
                self.dirty = True
                self._state_unsaved = True
            elif not dry_run:
                self.steps_refused += 1
            if not dry_run:  # writing the state after a kept step commits it
                self.undo.end(self._state_bytes() if result.applied and self.live_state_dir else None)
            report = StepReport(
                loss=_finite_or_none(result.loss), tokens=int(result.tokens),
                grad_norm=_finite_or_none(result.grad_norm),
                update_norm=_finite_or_none(result.update_norm), applied=bool(result.applied),
                reason=result.reason, seconds=float(result.seconds),
                cache_hits=int(result.cache_hits), weights_version=self.weights_version,
                changed_tensors=changed, dry_run=dry_run, probe_drift=_finite_or_none(probe_drift),
                request_id=request_id)
            summary = {k: v for k, v in report.to_dict().items() if k != "changed_tensors"}
            with self._recent_lock:
                self.recent.append(summary)
            if not dry_run:
                self._log("step", loss_kind=options.loss, lr=options.lr or self.lr, **summary)
            if result.applied:
                if self.scheduler is not None:
                    self.scheduler.mark_dirty()
                if self.steps_applied % self.save_every == 0:
                    self.save_optimizer_state()
        return report

    def _probe_mean_logp(self) -> float:
        assert self.probe is not None
        values = continuation_logprobs(self.model, self.probe.context_ids, self.probe.continuation_ids)
        return values.mean().item()

    def _check_probe(self, result: StepResult, state: dict[str, Any]) -> float:
        """Keep the step if the probe moved at most ``max_drift``; else undo it (``result``
        says so) from the step undo's copies and the optimizer ``state`` from before it."""
        assert self.probe is not None and self._probe_logp is not None
        after = self._probe_mean_logp()
        drift = after - self._probe_logp
        if math.isfinite(drift) and abs(drift) <= self.probe.max_drift:
            self._probe_logp = after
            return drift
        self.undo.restore()
        self.optimizer.load_state_dict(state)
        result.applied = False
        result.reason = (f"the probe text's mean log-prob moved {drift:+.3f} nats/token, more than "
                         f"{self.probe.max_drift} (step undone)")
        return drift

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
            self._probe_logp = None
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
        """The optimizer state and step counters, serialised with ``torch.save``."""
        payload = {"format": STATE_FORMAT, "optimizer": self.optimizer_kind,
                   "train_modules": self.train_modules, "param_names": list(self.trainable),
                   "steps_applied": self.steps_applied, "weights_version": self.weights_version,
                   "state_dict": self.optimizer.state_dict()}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

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
        """Load the newest saved state: the live one (after the last applied step) when it
        is at least as new as the directory's (saved at the last sync)."""
        live = last_kept_state(self.live_state_dir) if self.live_state_dir is not None else None
        states = [torch.load(io.BytesIO(live), weights_only=True)] if live is not None else []
        if self.optimizer_path.exists():
            states.append(torch.load(self.optimizer_path, weights_only=True))
        if not states:
            return "new"
        mine = (STATE_FORMAT, self.optimizer_kind, self.train_modules, list(self.trainable))
        fitting = [state for state in states if mine == (state.get("format"), state.get("optimizer"),
                                                         state.get("train_modules"), state.get("param_names"))]
        if not fitting:
            return (f"new (the saved state is for {states[0].get('optimizer')} on "
                    f"{states[0].get('train_modules')!r}; it will be replaced at the next sync)")
        saved = max(fitting, key=lambda state: state["weights_version"])
        self.optimizer.load_state_dict(saved["state_dict"])
        self.steps_applied = int(saved["steps_applied"])
        self.weights_version = int(saved["weights_version"])
        return f"restored ({self.steps_applied} steps)"

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
