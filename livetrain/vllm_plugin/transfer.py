"""A vLLM weight-transfer backend that reloads parameters from livetrain's shared copy.

Driven through vLLM's public weight-update API (``EngineClient.start_weight_update`` /
``update_weights`` / ``finish_weight_update``) and selected with
``--weight-transfer-config '{"backend": "livetrain_shm"}'`` (`settings.BACKEND`). Nothing travels but names:
the worker maps the shared copy once, and each update sends the vLLM parameters to
reload; their Hugging Face slices go through the model's own ``load_weights`` inside
vLLM's layerwise reload, which re-runs the kernel packing (oneDNN on CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from livetrain.weights import Layout, open_shared_copy


@dataclass
class SharedCopyInitInfo(WeightTransferInitInfo):
    directory: str  # a shared copy made by `livetrain.weights.create_shared_copy`


@dataclass
class SharedCopyUpdateInfo(WeightTransferUpdateInfo):
    params: list[str] = field(default_factory=list)  # vLLM parameter names, each reloaded whole


class SharedCopyTransferEngine(WeightTransferEngine[SharedCopyInitInfo, SharedCopyUpdateInfo]):
    """Reloads whole vLLM parameters from the shared copy, in place, kernels repacked."""

    init_info_cls = SharedCopyInitInfo
    update_info_cls = SharedCopyUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layout: Layout | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def init_transfer_engine(self, init_info: SharedCopyInitInfo) -> None:
        self.layout, self.tensors = open_shared_copy(init_info.directory)

    def start_weight_update(self) -> None:
        if self.layout is None:
            raise RuntimeError("livetrain weight transfer is not initialised: call init_weight_transfer_engine")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on CPU torch.
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: SharedCopyUpdateInfo) -> None:
        """Reload the named parameters, whole, in ONE call.

        vLLM's layerwise reload puts every layer on the meta device until it is finalised,
        and the engine keeps scheduling forward passes between separate RPCs: spreading
        initialise / load / finalise over start / update / finish would let a request run
        on meta tensors. Within one RPC no forward pass can interleave.
        """
        unknown = [name for name in update_info.params if name not in self.layout.params]
        if unknown:
            raise ValueError(f"not vLLM parameters of this model: {unknown[:3]}")
        initialize_layerwise_reload(self.model)
        try:
            self.model.load_weights(self._checkpoint_tensors(update_info.params))
        finally:
            # Never leave layers on the meta device: the next forward pass would fail.
            finalize_layerwise_reload(self.model, self.model_config)
        self._reprocess_tied_modules(update_info.params)

    def finish_weight_update(self) -> None:
        """Nothing left to do: each `update_weights` call is applied whole."""

    def shutdown(self) -> None:
        self.layout, self.tensors = None, {}

    def _checkpoint_tensors(self, params: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Every Hugging Face tensor of the given vLLM parameters: views of the shared copy."""
        for name in params:
            tensor = self.tensors[name]
            for s in self.layout.params[name].slices:
                yield s.hf_name, tensor[s.rows[0]:s.rows[1]]

    def _reprocess_tied_modules(self, params: list[str]) -> None:
        """Repack the kernels of modules that share a reloaded parameter (a tied ``lm_head``).

        vLLM's layerwise reload processes a tied parameter only in the module that loads it;
        on CPU the tied ``lm_head`` keeps its own packed copy, which would go stale.
        """
        reloaded = {id(self.model.get_parameter(name)) for name in params}
        owners = {name.rpartition(".")[0] for name in params}
        for module_name, module in self.model.named_modules():
            if module_name in owners or getattr(module, "quant_method", None) is None:
                continue
            if any(id(p) in reloaded for p in module.parameters(recurse=False)):
                module.quant_method.process_weights_after_loading(module)
