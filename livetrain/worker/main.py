"""The training worker process: ``python -m livetrain.worker --model-dir DIR --address ipc://...``.

It opens a :class:`TrainingSession` on the directory and serves it over ZMQ until a
``shutdown`` request, SIGTERM, or the death of the process that started it; then it
syncs and releases the directory. `livetrain.worker.process.WorkerProcess` starts one.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch

from livetrain.cpus import parse_cpus, pin_to_cores, schedule_normally, schedule_when_idle
from livetrain.options import TrainerOptions
from livetrain.session import ProbeGuard, TrainingSession
from livetrain.train.host_memory import retain_freed_memory
from livetrain.weights import remove_shared_copy
from livetrain.worker.handlers import session_handlers
from livetrain.worker.process import ABANDONED_MARK, SYNCED_MARK
from livetrain.worker.server import WorkerServer

log = logging.getLogger(__name__)


class UnsyncedStepsError(RuntimeError):
    """The worker stopped with applied steps that its last checkpoint sync could not write."""


def run_worker(model_dir: str | os.PathLike, address: str, trainer: TrainerOptions = TrainerOptions(), *,
               shared_copy: Path | None = None, runtime_dir: Path | None = None, parent: int | None = None) -> None:
    """Open a session on ``model_dir`` and serve it on ``address`` until shutdown.

    ``trainer``: how it trains (optimizer, modules, lr, sync interval, probe drift).
    ``shared_copy``: train the served weights in that directory (a step a crash tore
    there is undone first) instead of a private copy of the model directory.

    ``parent``: the process that started the worker (default: the current parent). Once
    it is gone, the worker finishes its step, syncs and exits rather than hold the
    directory forever, and then, as nobody else will, removes the synced ``shared_copy``
    and ``runtime_dir`` (the private directory of its socket); so it does too when that
    process left `ABANDONED_MARK` in ``runtime_dir`` (it exits without waiting: its exit
    may not be visible yet). After its final sync the worker marks the shared copy synced
    (`SYNCED_MARK`), so that whoever outlives it knows the copy may go. Raises
    `UnsyncedStepsError` if the last sync failed; the shared copy is then kept, and the
    next `livetrain serve` on the directory syncs it.
    """
    parent = os.getppid() if parent is None else parent

    def orphaned() -> bool:
        return os.getppid() != parent

    if shared_copy is not None:
        (shared_copy / SYNCED_MARK).unlink(missing_ok=True)  # this worker may apply steps to it
    model = served_model(model_dir, shared_copy) if shared_copy is not None else None
    probe = None
    if trainer.max_probe_drift is not None:
        from transformers import AutoTokenizer

        probe = ProbeGuard.from_text(AutoTokenizer.from_pretrained(model_dir), max_drift=trainer.max_probe_drift)
    session = TrainingSession.open(model_dir, trainer, model=model, scheduled_sync=True, probe=probe,
                                   live_state_dir=shared_copy, holder="livetrain serve (training worker)")
    if session.torn_step is not None:
        log.warning("undid step %d: the previous worker died while applying it (%d tensors restored)",
                    session.torn_step["weights_version"], session.torn_step["tensors"])
    if model is not None:
        # The served weights may hold steps the directory lacks (a previous worker died
        # before its sync): sync on schedule and at exit; unchanged blocks cost nothing.
        session.dirty = True
        if session.scheduler is not None:
            session.scheduler.mark_dirty()

    def close() -> None:
        """The final sync, at normal priority: whoever stops the server waits for it."""
        schedule_normally()
        session.close()
        if shared_copy is not None and not session.dirty:
            (shared_copy / SYNCED_MARK).touch()

    try:
        server = WorkerServer(address, {})
        server.handlers.update(session_handlers(session, lambda args: server.load(), close))
        if threading.current_thread() is threading.main_thread():
            # SIGTERM and Ctrl-C finish the running step, then sync and unlock below.
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: server.stop())
        server.serve_forever(orphaned=orphaned)
    finally:
        close()
    if session.dirty:  # the shutdown request's sync failed; its reply said why
        kept = (f"; they are kept in {shared_copy}, and the next livetrain serve on the directory syncs them"
                if shared_copy is not None else "")
        raise UnsyncedStepsError(f"the steps applied since the last sync could not be synced into {model_dir}{kept}")
    if orphaned() or (runtime_dir is not None and (runtime_dir / ABANDONED_MARK).exists()):
        # Nobody else will clean up after this worker.
        if shared_copy is not None:
            log.info("the process that started the training worker is gone: removing %s (synced)", shared_copy)
            remove_shared_copy(shared_copy)
        if runtime_dir is not None:
            shutil.rmtree(runtime_dir, ignore_errors=True)


def served_model(model_dir: Path, shared_copy: Path) -> torch.nn.Module:
    """The Hugging Face model whose parameters are views of the served weights (no copy)."""
    from transformers import AutoConfig

    from livetrain.weights import model_on_views, open_shared_copy

    layout, tensors = open_shared_copy(shared_copy)
    return model_on_views(AutoConfig.from_pretrained(model_dir), layout, tensors).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m livetrain.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--address", required=True, help="ipc://PATH (inside a 0700 directory)")
    TrainerOptions.add_arguments(parser)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--cpus", type=parse_cpus, metavar="LIST",
                        help="run every thread on these cores only, e.g. 1 or 2-3 (livetrain serve gives the "
                             "trainer cores vLLM's OpenMP threads do not use)")
    parser.add_argument("--shared-copy", type=Path,
                        help="train the served weights: a directory whose manifest.json holds their layout "
                             "and handles (livetrain.weights); default: load the model directory")
    parser.add_argument("--runtime-dir", type=Path,
                        help="the private directory of the socket: removed, with the synced shared copy, when "
                             "the worker exits because the process that started it is gone")
    parser.add_argument("--parent-pid", type=int,
                        help="the process that started the worker (default: its parent at start-up): once it "
                             "is gone the worker syncs and exits")
    parser.add_argument("--idle", action="store_true",
                        help="run every thread under SCHED_IDLE: only on cycles no other thread wants "
                             "(livetrain serve's default, beside vLLM's threads)")
    parser.add_argument("--wait-for-go", action="store_true",
                        help="import everything, then wait for a line on standard input before opening the "
                             "weights (livetrain serve starts the worker beside vLLM and says go once vLLM has "
                             "exported them); end of input exits")
    args = parser.parse_args(argv)
    if args.idle:
        schedule_when_idle()
    if args.cpus:
        pin_to_cores(args.cpus)
    retain_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s livetrain.worker %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.wait_for_go:
        import transformers  # noqa: F401  (the slow import, done while waiting)

        log.info("imported; waiting for the go to open the weights")
        if not sys.stdin.readline():
            return
    run_worker(args.model_dir, args.address, TrainerOptions.from_args(args), shared_copy=args.shared_copy,
               runtime_dir=args.runtime_dir, parent=args.parent_pid)


