"""vLLM's entry points into livetrain: a general plugin (every process) and an endpoint plugin (API server).

Both are named ``livetrain`` and enabled by adding ``livetrain`` to ``VLLM_PLUGINS``
(the launcher appends it). The general plugin installs the engine side (the
``livetrain_shm`` weight-transfer backend); the endpoint plugin mounts the training
routes and builds the `ServedModel` they use, as vLLM's endpoint-plugin contract asks.
"""

from __future__ import annotations

import ipaddress
import socket
from argparse import Namespace
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.datastructures import State

from livetrain.vllm_plugin.settings import BACKEND, PluginSettings
from livetrain.vllm_plugin.supervision import watch_supervisor

if TYPE_CHECKING:
    from livetrain.routes.pacing import StepPacer


class AccessRuleError(RuntimeError):
    """vLLM would listen beyond loopback while the training routes have no admin token."""


def register_general_plugin() -> None:
    """Register the ``livetrain_shm`` weight-transfer backend and, in the API server, stop
    vLLM when the `livetrain serve` that started it is gone (`supervision`). Idempotent:
    vLLM may call this more than once."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    watch_supervisor()
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, "livetrain.vllm_plugin.transfer",
                                                    "SharedCopyTransferEngine")
    except ValueError:
        pass  # already registered in this process


def is_loopback(host: str | None) -> bool:
    """Whether vLLM's ``--host`` value listens on loopback only (no value means every interface)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except socket.gaierror:
            return False


def check_access_rule(host: str | None, settings: PluginSettings) -> None:
    """Loopback, or an admin token: the training routes change the served model."""
    if not is_loopback(host) and settings.admin_token_file is None:
        raise AccessRuleError(
            f"vLLM listens on {host or 'every interface'} and the training routes have no admin token: "
            "serve on 127.0.0.1, or give livetrain serve --admin-token-file "
            "(LIVETRAIN_ADMIN_TOKEN_FILE when starting vLLM yourself)")


SERVED_ATTRIBUTE = "livetrain_served"  # the `ServedModel` on vLLM's app state


def _state_field(scope, attribute: str, name: str) -> Any:
    """``app.state.<attribute>.<name>`` of the request's app (None before `init_state` set it up)."""
    owner = getattr(scope["app"].state, attribute, None)
    return None if owner is None else getattr(owner, name)


def training_pacer(scope) -> "StepPacer | None":
    """The training routes' `StepPacer`."""
    from livetrain.routes import STATE_ATTRIBUTE

    return _state_field(scope, STATE_ATTRIBUTE, "pacer")


def served_refreshes(scope) -> int | None:
    """The refresh count of the app's `ServedModel`."""
    return _state_field(scope, SERVED_ATTRIBUTE, "refreshes")


class LivetrainEndpointPlugin:
    """The ``vllm.endpoint_plugins`` entry: livetrain's routes on vLLM's own port."""

    name = "livetrain"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        """Mount the training routes; salt generation requests with the served weights'
        refresh count so that no new request reuses prefix-cache blocks of older weights;
        count generation requests in flight for the training steps' pacer."""
        from livetrain.routes import router
        from livetrain.vllm_plugin.cache_salt import PrefixCacheSalt
        from livetrain.vllm_plugin.generation_count import GenerationCount

        app.include_router(router)
        app.add_middleware(PrefixCacheSalt, refreshes=served_refreshes)
        app.add_middleware(GenerationCount, pacer=training_pacer)

    async def init_state(self, engine_client, state: State, args: Namespace) -> None:
        """Check the access rule, export the weights, and install the routes' dependencies
        (with vLLM's ``--allowed-origins``, which the routes' cross-site checks follow).

        The training worker is reached at ``LIVETRAIN_WORKER_ADDRESS``; connecting is lazy,
        so the worker may start after vLLM (it maps the shared copy made here).
        """
        from livetrain.routes import TrainingRoutes
        from livetrain.routes.pacing import StepPacer
        from livetrain.vllm_plugin.served import ServedModel
        from livetrain.worker.connection import WorkerConnection

        settings = PluginSettings.from_env()
        check_access_rule(getattr(args, "host", None), settings)
        if engine_client is None:
            raise RuntimeError("livetrain needs an engine; it cannot run on vLLM's render-only server")
        if settings.worker_address is None:
            raise RuntimeError("LIVETRAIN_WORKER_ADDRESS is not set: start vLLM with livetrain serve, or set it "
                               "to the training worker's ipc:// address")
        served = ServedModel(engine_client, settings)
        await served.start()
        setattr(state, SERVED_ATTRIBUTE, served)

        async def refresh(changed_tensors: list[str], weights_version: int) -> dict[str, Any]:
            return (await served.refresh(changed_tensors, weights_version)).summary()

        token = settings.admin_token_file.read_text().strip() if settings.admin_token_file else None
        TrainingRoutes(worker=WorkerConnection(settings.worker_address), admin_token=token,
                       on_weights_changed=refresh, pacer=StepPacer(settings.trainer_duty),
                       allowed_origins=getattr(args, "allowed_origins", None) or ()).install(state)
