"""The plugin's settings, read from the environment the launcher sets (vLLM's argument parser knows none of them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from livetrain.options import DEFAULT_TRAIN_MODULES

CPU_MODES = ("reload", "zero-copy")
BACKEND = "livetrain_shm"  # the weight-transfer backend's name (--weight-transfer-config)


@dataclass(frozen=True)
class PluginSettings:
    """``shm_dir``: where the CPU shared copy lives (``/dev/shm/livetrain-*``).
    ``cpu_mode``: ``reload`` (refresh vLLM's packed kernels after each step) or
    ``zero-copy`` (serve the trained layers straight from the shared copy).
    ``train_modules``: the training worker's pattern (searched in Hugging Face tensor names);
    what zero-copy mode serves from the copy.
    ``admin_token_file``: set when the routes require a token (then any host may be served).
    ``worker_address``: the training worker's ZMQ address (``ipc://...``).
    ``consistent_updates``: pause generation (keeping requests) around each reload.
    ``trainer_duty``: while generation requests are in flight, the fraction of the time
    training steps may keep the trainer busy (`livetrain.routes.pacing`; 1: no pacing).
    """

    shm_dir: Path
    cpu_mode: str = "reload"
    train_modules: str = DEFAULT_TRAIN_MODULES
    admin_token_file: Path | None = None
    worker_address: str | None = None
    consistent_updates: bool = False
    trainer_duty: float = 1.0

    def __post_init__(self) -> None:
        if self.cpu_mode not in CPU_MODES:
            raise ValueError(f"LIVETRAIN_CPU_MODE must be one of {CPU_MODES}, not {self.cpu_mode!r}")
        if not 0 < self.trainer_duty <= 1:
            raise ValueError(f"LIVETRAIN_TRAINER_DUTY must be in (0, 1], not {self.trainer_duty}")

    def to_env(self) -> dict[str, str]:
        env = {"LIVETRAIN_SHM_DIR": str(self.shm_dir), "LIVETRAIN_CPU_MODE": self.cpu_mode,
               "LIVETRAIN_TRAIN_MODULES": self.train_modules}
        if self.admin_token_file is not None:
            env["LIVETRAIN_ADMIN_TOKEN_FILE"] = str(self.admin_token_file)
        if self.worker_address is not None:
            env["LIVETRAIN_WORKER_ADDRESS"] = self.worker_address
        if self.consistent_updates:
            env["LIVETRAIN_CONSISTENT_UPDATES"] = "1"
        if self.trainer_duty != 1.0:
            env["LIVETRAIN_TRAINER_DUTY"] = repr(self.trainer_duty)
        return env

    @classmethod
    def from_env(cls, env: os._Environ | dict[str, str] = os.environ) -> PluginSettings:
        token = env.get("LIVETRAIN_ADMIN_TOKEN_FILE")
        return cls(shm_dir=Path(env.get("LIVETRAIN_SHM_DIR", f"/dev/shm/livetrain-{os.getpid()}")),
                   cpu_mode=env.get("LIVETRAIN_CPU_MODE", "reload"),
                   train_modules=env.get("LIVETRAIN_TRAIN_MODULES", DEFAULT_TRAIN_MODULES),
                   admin_token_file=Path(token) if token else None,
                   worker_address=env.get("LIVETRAIN_WORKER_ADDRESS"),
                   consistent_updates=env.get("LIVETRAIN_CONSISTENT_UPDATES", "") not in ("", "0"),
                   trainer_duty=float(env.get("LIVETRAIN_TRAINER_DUTY", "1")))
