"""`livetrain serve`: vLLM with livetrain's plugin, and the training worker, supervised.

Start-up order: vLLM and the training worker's imports side by side; once vLLM is ready
(its worker extension has made the shared copy of the served weights) the worker is told
to go, maps that copy and owns the directory. On stop the worker syncs the checkpoint,
then vLLM stops, and the shared copy is removed only once everything applied is in the
directory: when that could not be (the worker was killed first) it is kept, and the next
server on the directory serves it and syncs it, so nothing applied is lost. Both children
die with the supervisor: the worker syncs and exits when orphaned, and vLLM, in a
process group of its own, is stopped by its plugin (`livetrain.vllm_plugin.supervision`).
What a server that did not stop cleanly left behind is found at start
(`livetrain.leftovers`); docs/deploy.md says how to run it under systemd or in a
container. CPU resources are set explicitly: vLLM's KV cache (its default is
0.9 x RAM) and the cores (`livetrain.cpus`): by default vLLM binds its threads as it would
alone and the trainer runs one thread on the cycles vLLM leaves idle; ``trainer_cores``
N > 0 gives the trainer the last N cores to itself instead.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from livetrain.cpus import core_layout, format_cpus
from livetrain.options import ADMIN_TOKEN_ENV, TrainerOptions
from livetrain.leftovers import check_port_free, remove_stale_runtime_dirs, wait_for_orphaned_lock_holder
from livetrain.vllm_plugin.launcher import VllmLaunch, check_supported, start_vllm, stop_vllm, wait_until_ready
from livetrain.vllm_plugin.plugins import check_access_rule
from livetrain.vllm_plugin.settings import PluginSettings
from livetrain.weights import remove_shared_copy
from livetrain.checkpoint.lock import STATE_DIRNAME, DirectoryLock
from livetrain.worker.process import ABANDONED_MARK, SYNCED_MARK, WorkerProcess, new_runtime_dir, worker_address

WORKER_READY_TIMEOUT_S = 300.0
SUPERVISE_POLL_S = 0.2


@dataclass
class ServeOptions:
    """Everything `livetrain serve` takes: ``trainer`` goes to the training worker, the
    rest shapes vLLM and the supervision. `vllm_args` are passed to vLLM unchanged."""

    model_dir: Path
    trainer: TrainerOptions = field(default_factory=TrainerOptions)
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token_file: Path | None = None
    cpu_mode: str = "reload"
    consistent_updates: bool = False
    kv_cache_gib: float = 1.0
    trainer_cores: int = 0
    trainer_duty: float = 0.5
    max_worker_restarts: int = 5
    vllm_args: Sequence[str] = field(default_factory=tuple)


class LiveServer:
    """vLLM + the training worker on one model directory. Use as a context manager."""

    def __init__(self, options: ServeOptions, say: Callable[[str], None] | None = None) -> None:
        self.options = options
        # Each line at once, also into a pipe or a file (a process manager's log).
        self.say = say or functools.partial(print, flush=True)
        self.model_dir = Path(options.model_dir).resolve()
        self.log_dir = self.model_dir / STATE_DIRNAME / "logs"
        self.runtime_dir: Path | None = None
        # Named after the directory, so a copy left by a server that died before syncing is
        # found (and reused, then synced) by the next server on the same directory.
        digest = hashlib.sha256(str(self.model_dir).encode()).hexdigest()[:16]
        self.shm_dir = Path(f"/dev/shm/livetrain-{self.model_dir.name}-{digest}")
        self.launch: VllmLaunch | None = None
        self.vllm: subprocess.Popen | None = None
        self.worker: WorkerProcess | None = None
        self.worker_restarts = 0
        # Whether the shared copy may hold applied steps the directory lacks (left by a server
        # that stopped before syncing, or trained by a worker): unless the worker marked it
        # synced, `stop` then keeps it for the next server on the directory. None until the
        # start-up check of the directory's lock: a copy seen before may be another server's.
        self.copy_unsynced: bool | None = None
        self.cores = core_layout(options.trainer_cores)
        self._stop: dict[str, int | None] | None = None  # the signal state while handlers are installed

    @property
    def base_url(self) -> str:
        return f"http://{self.options.host}:{self.options.port}"

    def start(self) -> float:
        """Start both sides; returns the seconds until both were ready, or until a stop
        signal (while `serve` handles them) cut the start short."""
        started = time.monotonic()
        options = self.options
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a model directory (no config.json)")
        check_supported(options.vllm_args)
        self.runtime_dir = new_runtime_dir()
        settings = PluginSettings(shm_dir=self.shm_dir, cpu_mode=options.cpu_mode,
                                  train_modules=options.trainer.train_modules,
                                  admin_token_file=self._token_file(),
                                  worker_address=worker_address(self.runtime_dir),
                                  consistent_updates=options.consistent_updates,
                                  trainer_duty=options.trainer_duty)
        check_access_rule(options.host, settings)
        # Fail now, not after vLLM's start-up, if another process owns the directory or the
        # port; the training worker of a server that was killed is given time to sync first.
        wait_for_orphaned_lock_holder(self.model_dir, self.say)
        DirectoryLock(self.model_dir, "livetrain serve (start-up check)").release()
        if (self.shm_dir / SYNCED_MARK).exists():
            remove_shared_copy(self.shm_dir)
            self.say(f"removed {self.shm_dir}, already synced by a server on this directory that is gone")
        self.copy_unsynced = self.shm_dir.exists()
        check_port_free(options.host, options.port)
        for path in remove_stale_runtime_dirs():
            self.say(f"removed {path}, left behind by a livetrain process that is gone")
        if self.copy_unsynced:
            self.say(f"found {self.shm_dir}: the served weights of a server on this directory that stopped "
                     f"before syncing them; serving them, and syncing them into {self.model_dir}")

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.launch = VllmLaunch(self.model_dir, settings, host=options.host, port=options.port,
                                 kv_cache_gib=options.kv_cache_gib,
                                 cpus=None if self.cores.vllm_cores is None else format_cpus(self.cores.vllm_cores),
                                 extra_args=tuple(options.vllm_args))
        vllm_log = self.log_dir / "vllm.log"
        self.say(f"starting vLLM on {self.base_url} (log: {vllm_log}) and the training worker beside it "
                 f"({self.cores.describe()})")
        # The worker imports while vLLM starts, and opens the weights once vLLM has exported them.
        self.worker = self._spawn_worker(wait_for_go=True)
        self.vllm = start_vllm(self.launch, vllm_log)
        seconds = wait_until_ready(self.launch, self.vllm, vllm_log, interrupted=self._stop_requested)
        if seconds is None:
            return time.monotonic() - started  # a stop signal arrived: `serve` stops at once
        self.say(f"vLLM ready after {seconds:.0f} s; waiting for the training worker")
        self.worker.go()
        self.copy_unsynced = True  # the worker may apply steps to it from now on
        self.worker.wait_ready(WORKER_READY_TIMEOUT_S)
        total = time.monotonic() - started
        self.say(f"ready after {total:.0f} s: OpenAI API at {self.base_url}/v1, "
                 f"training at {self.base_url}/train")
        return total

    def _spawn_worker(self, wait_for_go: bool = False) -> WorkerProcess:
        """The training worker on the shared copy, at the address vLLM's plugin was given.
        It restores the optimizer state saved in the directory (at each sync)."""
        options = self.options
        return WorkerProcess.spawn(
            self.model_dir, options.trainer, idle=self.cores.trainer_idle, cpus=self.cores.trainer_cores,
            threads=self.cores.trainer_threads, shared_copy=self.shm_dir, runtime_dir=self.runtime_dir,
            log_path=self.log_dir / "worker.log", wait_for_go=wait_for_go)

    def _token_file(self) -> Path | None:
        """The admin token as a file the plugin reads: --admin-token-file, or
        $LIVETRAIN_ADMIN_TOKEN written to a 0600 file in the private runtime directory."""
        if self.options.admin_token_file is not None:
            path = Path(self.options.admin_token_file).resolve()
            if not path.read_text().strip():
                raise ValueError(f"admin token file {path} is empty")
            return path
        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
        if not token:
            return None
        path = self.runtime_dir / "admin-token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return path

    def check(self) -> int | None:
        """One supervision round: restart a training worker that died; the exit status if
        vLLM died (then the worker is still up: :meth:`stop` syncs what it applied)."""
        if self.vllm.poll() is not None:
            self.say(f"vLLM exited with status {self.vllm.returncode} "
                     f"(log: {self.log_dir / 'vllm.log'}); syncing what was trained, then exiting")
            return 1
        if self.worker.popen.poll() is not None:
            status = self.worker.popen.returncode
            self.worker_restarts += 1
            if self.worker_restarts > self.options.max_worker_restarts:
                self.say(f"the training worker exited with status {status} and was already restarted "
                         f"{self.options.max_worker_restarts} times (log: {self.log_dir / 'worker.log'})")
                return 1
            self.say(f"the training worker exited with status {status} (log: {self.log_dir / 'worker.log'}); "
                     "inference goes on, training answers 503 until it is back: restarting it")
            started = time.monotonic()
            self.worker = self._spawn_worker()
            self.worker.wait_ready(WORKER_READY_TIMEOUT_S)
            self.say(f"training available again after {time.monotonic() - started:.1f} s")
        return None

    def supervise(self) -> int:
        """Block until a signal (clean stop, exit 0) or until vLLM dies (exit 1). A training
        worker that dies is restarted (up to ``max_worker_restarts`` times)."""
        with self._signals_stop() as stop:
            while stop["signal"] is None:
                status = self.check()
                if status is not None:
                    return status
                time.sleep(SUPERVISE_POLL_S)
            self.say("stopping: syncing the checkpoint, then stopping vLLM")
            return 0

    def _copy_synced(self) -> bool:
        """Whether the shared copy holds nothing the directory lacks: this server's, and never
        trained, or marked synced by the last worker that trained it."""
        if self.copy_unsynced is None:
            return False
        return not self.copy_unsynced or (self.shm_dir / SYNCED_MARK).exists()

    def _stop_requested(self) -> bool:
        return self._stop is not None and self._stop["signal"] is not None

    @contextlib.contextmanager
    def _signals_stop(self) -> Iterator[dict[str, int | None]]:
        """SIGINT/SIGTERM set ``stop["signal"]``; a second one ends vLLM and this process at
        once (the worker, orphaned, finishes its step, syncs, and removes the shared copy and
        the runtime directory; syncs are crash-consistent).
        Nested uses share the outermost one's state, so a signal counts as the first or the
        second wherever it arrives (e.g. during the clean stop after `supervise` returned)."""
        if self._stop is not None:
            yield self._stop
            return
        stop: dict[str, int | None] = {"signal": None}

        def on_signal(signum: int, frame: object) -> None:
            if stop["signal"] is not None:
                if self.vllm is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.vllm.pid, signal.SIGKILL)
                # Whoever finishes last cleans up: this process, if the worker has marked the copy
                # synced; else the worker, after its sync, finding the mark left here first.
                if self.runtime_dir is not None:
                    (self.runtime_dir / ABANDONED_MARK).touch()
                if self._copy_synced():
                    remove_shared_copy(self.shm_dir)
                    if self.runtime_dir is not None:
                        shutil.rmtree(self.runtime_dir, ignore_errors=True)
                os._exit(128 + signum)
            stop["signal"] = signum

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._stop = stop
        try:
            yield stop
        finally:
            self._stop = None
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self) -> bool:
        """Stop the training worker (it finishes its step and syncs), then vLLM; remove the
        runtime directory, and the shared copy once everything applied is in the directory.
        Returns whether it is: if not (the worker was killed before it synced), the shared
        copy is kept and the next `livetrain serve` on the directory serves it and syncs it.

        vLLM stops second, although the worker's sync does not need it: a /train request
        whose step the worker finishes during the stop still has its refresh of the served
        weights to make through vLLM's engine, which vLLM's own stop would abort."""
        if self.worker is not None:
            status = self.worker.stop()
            if status != 0:
                self.say(f"the training worker exited with status {status} (log: {self.log_dir / 'worker.log'})")
            self.worker = None
        if self.vllm is not None:
            stop_vllm(self.vllm)
            self.vllm = None
        kept = bool(self.copy_unsynced) and self.shm_dir.exists() and not self._copy_synced()
        if kept:
            self.say(f"kept {self.shm_dir}: the served weights, with applied steps that are not in {self.model_dir}; "
                     f"the next `livetrain serve --model {self.model_dir}` serves them and syncs them")
        elif self.copy_unsynced is not None:
            remove_shared_copy(self.shm_dir)
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return not kept

    def __enter__(self) -> "LiveServer":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(options: ServeOptions) -> int:
    """Run until Ctrl-C or SIGTERM; the exit status of `livetrain serve` (1 if vLLM died, or if
    applied steps could not be synced and were kept for the next server)."""
    server = LiveServer(options)
    with server._signals_stop() as stop:  # also while starting and while stopping
        try:
            server.start()
            status = 0 if stop["signal"] is not None else server.supervise()
        finally:
            synced = server.stop()
    return status if synced else 1

