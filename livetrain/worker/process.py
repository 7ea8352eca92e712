"""The training worker process: ``python -m livetrain.worker --model-dir DIR --address ipc://...``.

It opens a :class:`TrainingSession` on the directory and serves it over ZMQ until a
``shutdown`` request or SIGTERM, then syncs and releases the directory.
:class:`WorkerProcess` starts one from another process (the vLLM plugin's launcher,
tests): it makes a private runtime directory (mode 0700) for the ``ipc://`` socket,
waits until the worker answers, and stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from livetrain.checkpoint import GenerationNotFoundError
from livetrain.cpus import format_cpus, parse_cpus
from livetrain.train.data import DataFormatError, Example, SFTExample, parse_record
from livetrain.train.host_memory import retain_freed_memory
from livetrain.train.step import InvalidExampleError, StepOptions, validate_examples
from livetrain.weights import remove_shared_copy
from livetrain.worker import protocol
from livetrain.worker.connection import call_worker
from livetrain.worker.protocol import WorkerError
from livetrain.worker.server import Handler, WorkerServer
from livetrain.worker.session import DEFAULT_TRAIN_MODULES, OPTIMIZERS, ProbeGuard, TrainingSession

log = logging.getLogger(__name__)
SOCKET_NAME = "worker.sock"
SYNCED_MARK = "synced"  # in the shared copy: everything applied to it is in the model directory
ABANDONED_MARK = "abandoned"  # in the runtime directory: the worker's starter exits without waiting for it
RUNTIME_DIR_PREFIX = "livetrain-run-"


def session_handlers(session: TrainingSession, server_status: Handler,
                     close: Callable[[], None] | None = None) -> dict[str, Handler]:
    """The worker's operations (see :mod:`livetrain.worker.protocol`) on ``session``;
    ``shutdown`` calls ``close`` (default: ``session.close``)."""

    def train(args: dict[str, Any]) -> dict[str, Any]:
        examples = _examples(args.get("examples"))
        options = _step_options(args.get("options") or {})
        with _invalid_as_request_error():
            return session.train(examples, options, request_id=args.get("request_id")).to_dict()

    def logprobs(args: dict[str, Any]) -> dict[str, Any]:
        example = _examples([args])[0]
        if not isinstance(example, SFTExample):
            raise WorkerError("give context_ids and continuation_ids", protocol.INVALID_REQUEST)
        with _invalid_as_request_error():
            validate_examples(session.model, [example], "sft")
            values = session.logprobs(example.context_ids, example.continuation_ids)
        return {"logprobs": values, "sum": sum(values), "tokens": len(values),
                "weights_version": session.weights_version}

    def status(args: dict[str, Any]) -> dict[str, Any]:
        return {**session.status(), **server_status(args), "pid": os.getpid()}

    def rollback(args: dict[str, Any]) -> dict[str, Any]:
        to = args.get("generation")
        if not isinstance(to, int) or isinstance(to, bool):
            raise WorkerError("generation must be an integer", protocol.INVALID_REQUEST, param="generation")
        reachable = session.directory.reachable()
        if not session.dirty and to not in reachable:
            # Refused before rollback's own sync, so a bad request leaves no trace in the directory.
            raise WorkerError(f"cannot roll back to generation {to}: the generations that can be restored "
                              f"are {sorted(reachable)} (GET /checkpoint lists them)", protocol.NOT_FOUND,
                              param="generation")
        try:
            return session.rollback(to)
        except GenerationNotFoundError as exc:
            raise WorkerError(str(exc), protocol.NOT_FOUND, param="generation") from None

    def shutdown(args: dict[str, Any]) -> dict[str, Any]:
        (close or session.close)()
        return {"closed": True, "last_generation": session.last_generation}

    return {"train": train, "logprobs": logprobs, "status": status,
            "checkpoint": lambda args: session.sync(),
            "generations": lambda args: {"generations": session.generations()},
            "rollback": rollback, "shutdown": shutdown}


def _examples(records: Any) -> list[Example]:
    if not isinstance(records, list) or not records:
        raise WorkerError("examples must be a non-empty list", protocol.INVALID_REQUEST, param="examples")
    examples = []
    for i, record in enumerate(records):
        try:
            examples.append(parse_record(record))
        except DataFormatError as exc:
            raise WorkerError(f"examples[{i}].{exc.field}: {exc.reason}", protocol.INVALID_REQUEST,
                              param=f"examples[{i}].{exc.field}") from None
    return examples


def _step_options(fields: dict[str, Any]) -> StepOptions:
    known = {f.name for f in dataclasses.fields(StepOptions)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise WorkerError(f"unknown step option(s): {', '.join(unknown)}", protocol.INVALID_REQUEST,
                          param=unknown[0])
    return StepOptions(**fields)


@contextlib.contextmanager
def _invalid_as_request_error() -> Iterator[None]:
    try:
        yield
    except InvalidExampleError as exc:
        raise WorkerError(str(exc), protocol.INVALID_REQUEST, param="examples") from None


class UnsyncedStepsError(RuntimeError):
    """The worker stopped with applied steps that its last checkpoint sync could not write."""


def run_worker(model_dir: str | os.PathLike, address: str, *, optimizer: str = "apollo-mini",
               train_modules: str = DEFAULT_TRAIN_MODULES, lr: float | None = None,
               sync_interval_s: float | None = 600.0, max_probe_drift: float | None = 0.5,
               shared_copy: Path | None = None, runtime_dir: Path | None = None,
               parent: int | None = None) -> None:
    """Open a session on ``model_dir`` and serve it on ``address`` until shutdown.

    ``max_probe_drift``: undo a step that moves the probe text's mean log-prob by more
    than this many nats per token (None: no probe). ``shared_copy``: train the served
    weights in that directory (a step a crash tore there is undone first) instead of a
    private copy of the model directory.

    ``parent``: the process that started the worker (default: the current parent). Once
    it is gone, the worker finishes its step, syncs and exits rather than hold the
    directory forever, and then, as nobody else will, removes the synced ``shared_copy``
    and ``runtime_dir`` (the private directory of its socket); so it does too when that
    process left `ABANDONED_MARK` in ``runtime_dir`` (it exits without waiting: its exit
    may not be visible yet). After its final sync the worker marks the shared copy synced
    (`SYNCED_MARK`), so that whoever outlives it knows the copy may go. Raises `UnsyncedStepsError` if the last sync failed; the shared copy
    is then kept, and the next `livetrain serve` on the directory syncs it.
    """
    parent = os.getppid() if parent is None else parent

    def orphaned() -> bool:
        return os.getppid() != parent

    if shared_copy is not None:
        (shared_copy / SYNCED_MARK).unlink(missing_ok=True)  # this worker may apply steps to it
    model = served_model(model_dir, shared_copy) if shared_copy is not None else None
    probe = None
    if max_probe_drift is not None:
        from transformers import AutoTokenizer

        probe = ProbeGuard.from_text(AutoTokenizer.from_pretrained(model_dir), max_drift=max_probe_drift)
    session = TrainingSession.open(model_dir, optimizer=optimizer, train_modules=train_modules,
                                   model=model, lr=lr, sync_interval_s=sync_interval_s, probe=probe,
                                   live_state_dir=shared_copy,
                                   holder="livetrain serve (training worker)")
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
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="apollo-mini")
    parser.add_argument("--train-modules", default=DEFAULT_TRAIN_MODULES)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--sync-interval", type=float, default=600.0,
                        help="seconds after the last applied step before a checkpoint sync")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--cpus", type=parse_cpus, metavar="LIST",
                        help="run every thread on these cores only, e.g. 1 or 2-3 (livetrain serve gives the "
                             "trainer cores vLLM's OpenMP threads do not use)")
    parser.add_argument("--max-probe-drift", type=float, default=0.5,
                        help="undo a step that moves a fixed probe text's mean log-prob by more than this "
                             "(nats per token); 0 turns the check off")
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

        if not sys.stdin.readline():
            return
    run_worker(args.model_dir, args.address, optimizer=args.optimizer,
               train_modules=args.train_modules, lr=args.lr, sync_interval_s=args.sync_interval,
               max_probe_drift=args.max_probe_drift or None, shared_copy=args.shared_copy,
               runtime_dir=args.runtime_dir, parent=args.parent_pid)


def schedule_when_idle() -> None:
    """Put every thread of this process under Linux's ``SCHED_IDLE`` policy: it runs only
    when a core has nothing else to run (threads started afterwards inherit their creator's)."""
    for thread in _own_threads():
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))


def schedule_normally() -> None:
    """Put the threads under ``SCHED_IDLE`` back under ``SCHED_OTHER``, for the final sync:
    whoever stops the server waits for it, and on a busy machine idle cycles may not come.
    Leaving ``SCHED_IDLE`` needs CAP_SYS_NICE or an RLIMIT_NICE of at least 20 (nice 0);
    without either the sync stays on idle cycles, and the log says so."""
    for thread in _own_threads():
        try:
            if os.sched_getscheduler(thread) == os.SCHED_IDLE:
                os.sched_setscheduler(thread, os.SCHED_OTHER, os.sched_param(0))
        except ProcessLookupError:
            continue  # the thread has ended
        except PermissionError:
            log.warning("the final sync runs on idle cycles only: leaving SCHED_IDLE needs CAP_SYS_NICE or "
                        "RLIMIT_NICE >= 20 (systemd: LimitNICE=+0)")
            return


def pin_to_cores(cores: set[int]) -> None:
    """Run every thread of this process, and those started afterwards, on ``cores`` only."""
    for thread in _own_threads():
        os.sched_setaffinity(thread, cores)


def _own_threads() -> list[int]:
    """The Linux thread ids of this process's threads."""
    return [int(task) for task in os.listdir("/proc/self/task")]


def runtime_base() -> Path:
    """Where runtime directories are made: $XDG_RUNTIME_DIR if set, else the temporary directory."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())


def new_runtime_dir() -> Path:
    """A private (0700) directory for the worker's socket, under :func:`runtime_base`, named
    after this process, so that one left behind by a process that is gone can be told apart
    (`livetrain.leftovers`)."""
    runtime_dir = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_DIR_PREFIX}{os.getpid()}-", dir=runtime_base()))
    os.chmod(runtime_dir, 0o700)
    return runtime_dir


def worker_address(runtime_dir: str | os.PathLike) -> str:
    """The ZMQ address of the worker whose socket lives in ``runtime_dir``."""
    return f"ipc://{Path(runtime_dir) / SOCKET_NAME}"


class WorkerProcess:
    """A training worker started as a child process, reachable at :attr:`address`."""

    def __init__(self, popen: subprocess.Popen, runtime_dir: Path, owns_runtime_dir: bool) -> None:
        self.popen = popen
        self.runtime_dir = runtime_dir
        self.owns_runtime_dir = owns_runtime_dir  # remove it on stop (a caller's is left alone)
        self.address = worker_address(runtime_dir)

    @classmethod
    def start(cls, model_dir: str | os.PathLike, *, ready_timeout_s: float = 300.0,
              **options: Any) -> "WorkerProcess":
        """Start ``python -m livetrain.worker`` (options as for :meth:`spawn`) and wait until
        it answers ``status``."""
        worker = cls.spawn(model_dir, **options)
        try:
            worker.wait_ready(ready_timeout_s)
        except BaseException:
            worker.stop(timeout_s=10)
            raise
        return worker

    @classmethod
    def spawn(cls, model_dir: str | os.PathLike, *, optimizer: str = "apollo-mini",
              train_modules: str = DEFAULT_TRAIN_MODULES, lr: float | None = None,
              sync_interval_s: float = 600.0, threads: int | None = None, max_probe_drift: float = 0.5,
              shared_copy: str | os.PathLike | None = None, runtime_dir: str | os.PathLike | None = None,
              idle: bool = False, cpus: Iterable[int] | None = None, env: dict[str, str] | None = None,
              log_path: str | os.PathLike | None = None, wait_for_go: bool = False) -> "WorkerProcess":
        """Start ``python -m livetrain.worker``; do not wait for it.

        ``runtime_dir``: a directory from :func:`new_runtime_dir` when the address must be
        known beforehand (vLLM's plugin is told it before the worker starts); it is
        removed by :meth:`stop`. ``shared_copy``: train the served weights (see
        ``--shared-copy``). ``idle``: every worker thread runs under ``SCHED_IDLE``.
        ``cpus``: the cores every worker thread runs on (default: any).
        ``log_path``: append the worker's output there instead of inheriting this process's.
        ``wait_for_go``: the worker imports, then waits for :meth:`go` before it opens the
        weights (so its start-up overlaps vLLM's).
        """
        owns_runtime_dir = runtime_dir is None
        runtime_dir = new_runtime_dir() if owns_runtime_dir else Path(runtime_dir)
        command = [sys.executable, "-m", "livetrain.worker", "--model-dir", str(model_dir),
                   "--address", worker_address(runtime_dir), "--runtime-dir", str(runtime_dir),
                   "--parent-pid", str(os.getpid()), "--optimizer", optimizer,
                   "--train-modules", train_modules, "--sync-interval", str(sync_interval_s),
                   "--max-probe-drift", str(max_probe_drift)]
        if lr is not None:
            command += ["--lr", str(lr)]
        if threads is not None:
            command += ["--threads", str(threads)]
        if shared_copy is not None:
            command += ["--shared-copy", str(shared_copy)]
        if idle:
            command.append("--idle")
        if cpus is not None:
            command += ["--cpus", format_cpus(cpus)]
        if wait_for_go:
            command.append("--wait-for-go")
        stdin = subprocess.PIPE if wait_for_go else None if log_path is None else subprocess.DEVNULL
        if log_path is None:
            popen = subprocess.Popen(command, env=env, stdin=stdin)
        else:
            with open(log_path, "ab") as log_file:
                popen = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=stdin)
        return cls(popen, runtime_dir, owns_runtime_dir)

    def go(self) -> None:
        """Let a worker spawned with ``wait_for_go`` open the weights and start serving."""
        self.popen.stdin.write(b"go\n")
        self.popen.stdin.close()

    @property
    def waiting_for_go(self) -> bool:
        """Spawned with ``wait_for_go`` and neither told :meth:`go` nor stopped: it has opened nothing."""
        return self.popen.stdin is not None and not self.popen.stdin.closed

    def running(self) -> bool:
        """Whether the process has not exited (reaps it if it has)."""
        return self.popen.poll() is None

    def request(self, op: str, args: dict[str, Any] | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
        """One request; fails with ``worker_stopped`` as soon as the process exits without answering."""
        return call_worker(self.address, op, args, timeout_s=timeout_s, alive=self.running)

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"the training worker exited with status {self.popen.returncode} "
                                   "before it was ready (its log is above)")
            try:
                return self.request("status", timeout_s=1.0)
            except WorkerError as exc:
                if exc.code != "worker_stopped" and (exc.type != protocol.TIMEOUT or time.monotonic() > deadline):
                    raise

    def stop(self, timeout_s: float = 120.0) -> int:
        """Ask for a clean shutdown (finish the step, sync) and wait for the exit; SIGTERM,
        then SIGKILL, when the worker does not answer or exit within ``timeout_s``. A worker
        that stops by itself meanwhile (it got the same signal as this process) is noticed
        at once and reaped. A worker still waiting for :meth:`go` is told to exit by the
        end of its input. Returns the exit status (0: everything it applied is synced)."""
        if self.waiting_for_go:
            self.popen.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout_s)
        if self.popen.poll() is None:
            try:
                self.request("shutdown", timeout_s=timeout_s)
            except WorkerError as exc:
                # Any other failure means it is stopping, or has stopped, by itself: wait for it.
                if exc.type == protocol.TIMEOUT:
                    log.warning("%s; terminating the training worker", exc.message)
                    self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.owns_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return self.popen.returncode
