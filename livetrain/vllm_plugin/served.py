"""The served model as the routes see it: weights export, refresh after a step, prefix cache.

Lives in vLLM's API-server process and reaches the engine only through its public
`EngineClient` (``collective_rpc`` to the worker extension, the weight-update API,
``reset_prefix_cache``). Everything it returns is plain data, so the routes and the
training worker never see a vLLM type.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest
from vllm.engine.protocol import EngineClient

from livetrain.vllm_plugin.extension import QUALNAME
from livetrain.vllm_plugin.settings import BACKEND, PluginSettings
from livetrain.weights import Layout


@dataclass(frozen=True)
class RefreshResult:
    """What one refresh did: the vLLM parameters reloaded (whole), its time, and how stale
    prefix-cache blocks were dealt with: "reset" (dropped), or "salted" (vLLM refused to
    drop them while requests held blocks; new requests carry the new refresh count in
    their cache salt, so none reuses them, and they are evicted like any unused block)."""

    params: list[str]
    seconds: float
    prefix_cache_reset: str  # "reset" | "salted"

    def summary(self) -> dict[str, Any]:
        """What a /train response says of it: how many parameters were reloaded, the seconds,
        and how stale prefix-cache blocks were dealt with."""
        return {"params_reloaded": len(self.params), "seconds": round(self.seconds, 4),
                "prefix_cache_reset": self.prefix_cache_reset}


class ServedModel:
    """The vLLM side of livetrain in the API-server process (one engine, tensor parallel 1)."""

    def __init__(self, engine_client: EngineClient, settings: PluginSettings) -> None:
        self.engine = engine_client
        self.settings = settings
        self.layout: Layout | None = None
        self.weights_export: dict[str, Any] | None = None  # {layout, handles, reused}: for the training worker
        self.zero_copy: set[str] = set()  # vLLM parameters served straight from the shared copy
        self.kind = ""  # "shm" (CPU shared copy) or "cuda_ipc" (vLLM's own GPU weights)
        # Refreshes so far: the generation routes' prefix-cache salt (see cache_salt).
        self.refreshes = 0

    async def _worker(self, method: str, *args: Any) -> Any:
        (result,) = await self.engine.collective_rpc(method, args=args)
        return result

    async def start(self) -> None:
        """Export the weights and set up the CPU serving mode; call once, after the engine is up."""
        try:
            self.weights_export = await self._worker("livetrain_export_weights", str(self.settings.shm_dir))
        except Exception as exc:
            if "livetrain_export_weights" not in str(exc):
                raise
            raise RuntimeError(f"vLLM's worker has no livetrain extension ({exc}): start vLLM with "
                               f"--worker-extension-cls {QUALNAME} --weight-transfer-config "
                               f"'{{\"backend\": \"{BACKEND}\"}}' (livetrain serve does)") from exc
        self.layout = Layout.from_dict(self.weights_export["layout"])
        self.kind = next(iter(self.weights_export["handles"].values()))["kind"]
        if self.kind != "shm":
            return  # GPU: the trainer updates vLLM's own tensors in place; nothing to reload
        await self.engine.init_weight_transfer_engine(
            WeightTransferInitRequest(init_info={"directory": str(self.settings.shm_dir)}))
        if self.settings.cpu_mode == "zero-copy":
            self.zero_copy = set(await self._worker("livetrain_serve_zero_copy", str(self.settings.shm_dir),
                                                    self.settings.train_modules))
        if self.weights_export["reused"]:  # the copy holds steps vLLM loaded from disk without
            await self.refresh(self.layout.hf_names())

    async def refresh(self, changed_tensors: Iterable[str], weights_version: int | None = None, *,
                      consistent: bool | None = None) -> RefreshResult:
        """Make vLLM serve the shared copy's current values of ``changed_tensors`` (Hugging Face names).

        CPU reload mode reloads every vLLM parameter that contains a changed tensor, whole
        (all of q, k, v for a changed q_proj), through vLLM's weight-update API; zero-copy
        parameters and GPU weights need nothing. Then stale prefix-cache blocks are dropped.
        ``consistent`` (default: the settings' ``consistent_updates``) pauses generation
        around the reload, keeping in-flight requests (never aborting them), so no forward
        pass sees a half-reloaded model; without it generation goes on (HOGWILD).
        """
        started = time.perf_counter()
        params = [] if self.kind != "shm" else [
            p for p in self.layout.params_to_refresh(changed_tensors) if p not in self.zero_copy]
        consistent = self.settings.consistent_updates if consistent is None else consistent
        if consistent:
            await self.engine.pause_generation(mode="keep", clear_cache=False)
        try:
            if params:
                version = None if weights_version is None else str(weights_version)
                await self.engine.start_weight_update()
                try:
                    await self.engine.update_weights(WeightTransferUpdateRequest(update_info={"params": params}))
                except BaseException:
                    # vLLM's worker ends an update whose update_weights failed; one that failed
                    # before reaching it is still open and would refuse every later start.
                    # Either way the first error is the one to report.
                    with contextlib.suppress(Exception):
                        await self.engine.finish_weight_update(weight_version=version)
                    raise
                await self.engine.finish_weight_update(weight_version=version)
            self.refreshes += 1
            reset = await self.reset_prefix_cache()
        finally:
            if consistent:
                await self.engine.resume_generation()
        return RefreshResult(params, time.perf_counter() - started, reset)

    async def reset_prefix_cache(self) -> str:
        """Drop prefix-cache blocks computed with old weights if vLLM can ("reset").

        vLLM refuses while a request holds blocks ("salted"). Forcing it would preempt
        the running requests, which then recompute from scratch; instead they keep their
        KV (HOGWILD), and the refresh count in every new request's cache salt keeps new
        requests off the stale blocks (see `cache_salt`).
        """
        return "reset" if await self.engine.reset_prefix_cache() else "salted"

    async def read_param(self, name: str) -> dict[str, Any]:
        """The values vLLM serves for one parameter (see the worker extension's ``livetrain_read_param``)."""
        return await self._worker("livetrain_read_param", name)
