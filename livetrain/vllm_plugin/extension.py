"""The worker extension: livetrain's methods on vLLM's worker (``--worker-extension-cls``).

vLLM appends this class to its Worker's bases, so ``self`` is the worker; every method
is prefixed ``livetrain_`` so none collides with the Worker's, and each is called
through ``EngineClient.collective_rpc`` with plain data in and out.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from livetrain.vllm_plugin.layout import derive_layout
from livetrain.weights import (Layout, create_shared_copy, export_cuda_tensor, hf_views, open_shared_copy,
                               publish_handles)
from livetrain.formats.dtypes import dtype_name
from livetrain.weights.shared_copy import MANIFEST, map_handles, read_manifest
from livetrain.weights.step_undo import undo_torn_step

logger = logging.getLogger(__name__)

QUALNAME = "livetrain.vllm_plugin.extension.LivetrainWorkerExtension"


class SharedWeightLinear:
    """A CPU linear kernel that multiplies by the shared copy's tensors instead of vLLM's packed ones.

    Installed as a layer's ``cpu_linear`` (what vLLM's CPU GEMM dispatch calls with
    ``(x, layer.weight, layer.bias)``); it ignores vLLM's tensors, so the next forward
    sees whatever the trainer wrote into the shared copy.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias  # [out, in], [out]

    def __call__(self, x: torch.Tensor, _weight: torch.Tensor, _bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # [..., in] -> [..., out]


class LivetrainWorkerExtension:
    """Layout, weight export and CPU serving modes, run inside vLLM's worker process."""

    def _livetrain_layout(self) -> Layout:
        if getattr(self, "_livetrain_layout_cache", None) is None:
            model_config = self.vllm_config.model_config
            self._livetrain_layout_cache = derive_layout(
                self.model_runner.get_model(), model_config.model, model_config.dtype,
                self.vllm_config.parallel_config.tensor_parallel_size)
        return self._livetrain_layout_cache

    def livetrain_export_weights(self, shm_dir: str) -> dict[str, Any]:
        """Make the weights mappable by the training worker; returns ``{layout, handles, reused}``.

        CPU: vLLM keeps no plain linear weights, so the shared copy is made from the model
        directory in ``shm_dir``; if ``shm_dir`` already holds a copy of this layout (a
        restart before the copy was synced) it is reused (``reused``: the caller must then
        reload every parameter from it), after undoing a step a crash tore there.
        GPU: CUDA IPC handles of vLLM's own parameters, published in ``shm_dir`` for the
        training worker (untested here: no GPU on the CI machine); the worker trains
        vLLM's tensors in place.
        """
        layout = self._livetrain_layout()
        model = self.model_runner.get_model()
        if self.device.type == "cuda":
            params = dict(model.named_parameters())
            handles = {name: export_cuda_tensor(params[name].data) for name in layout.params}
            publish_handles(shm_dir, self.vllm_config.model_config.model, layout, handles)
            return {"layout": layout.to_dict(), "handles": {n: h.to_dict() for n, h in handles.items()},
                    "reused": False}
        if (Path(shm_dir) / MANIFEST).exists():
            manifest = read_manifest(shm_dir)
            existing = Layout.from_dict(manifest["layout"])
            if existing.params.keys() != layout.params.keys() or existing.hf_shapes != layout.hf_shapes:
                raise RuntimeError(f"{shm_dir} holds a shared copy of another model; remove it first")
            tensors = map_handles(manifest["handles"])
            torn = undo_torn_step(shm_dir, hf_views(existing, tensors))
            if torn is not None:
                logger.warning("livetrain: undid step %d in %s: a crash tore it (%d tensors restored)",
                               torn["weights_version"], shm_dir, torn["tensors"])
            bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
            if bad:
                raise RuntimeError(f"the shared copy left in {shm_dir} has non-finite values in {bad[:3]}: "
                                   "remove it to serve the model directory as it is on disk")
            logger.warning("livetrain: reusing the shared copy left in %s (steps not yet synced)", shm_dir)
            return {"layout": layout.to_dict(), "handles": manifest["handles"], "reused": True}
        handles = create_shared_copy(self.vllm_config.model_config.model, layout, shm_dir)
        return {"layout": layout.to_dict(), "handles": {n: h.to_dict() for n, h in handles.items()},
                "reused": False}

    def livetrain_serve_zero_copy(self, shm_dir: str, hf_pattern: str) -> list[str]:
        """CPU mode (a): serve the linear layers whose Hugging Face tensors match ``hf_pattern``
        straight from the shared copy (``F.linear`` on the shared tensors, zero copy).

        Returns the vLLM parameters now served from the copy (weights and their biases);
        those never need a reload. Requires the copy's dtype to be the served dtype.
        """
        layout, tensors = open_shared_copy(shm_dir)
        model = self.model_runner.get_model()
        served_dtype = self.vllm_config.model_config.dtype
        pattern = re.compile(hf_pattern)
        swapped: list[str] = []
        for name, param in layout.params.items():
            module_name, _, attr = name.rpartition(".")
            if attr != "weight" or not any(pattern.search(s.hf_name) for s in param.slices):
                continue
            module = model.get_submodule(module_name)
            if not hasattr(module, "cpu_linear"):
                continue  # not a linear layer on vLLM's CPU GEMM path
            if tensors[name].dtype != served_dtype:
                raise RuntimeError(f"zero-copy serving needs the checkpoint in the served dtype {served_dtype}; "
                                   f"{name} is {tensors[name].dtype} (serve with --dtype {dtype_name(tensors[name].dtype)})")
            bias_name = f"{module_name}.bias"
            bias = tensors.get(bias_name)
            module.cpu_linear = SharedWeightLinear(tensors[name], bias)
            swapped += [name] + ([bias_name] if bias is not None else [])
        self._livetrain_zero_copy_tensors = tensors  # keep the mappings alive
        return swapped

    def livetrain_read_param(self, name: str) -> dict[str, Any]:
        """The values vLLM serves for parameter ``name``: ``{dtype, shape, data}`` (raw bytes).

        A CPU linear weight (packed, or a tied ``lm_head``'s own packed copy) is read back
        through its kernel: multiplying the identity by it returns every weight exactly
        (one non-zero product per output).
        """
        model = self.model_runner.get_model()
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        param = model.get_parameter(name)
        with torch.no_grad():
            if attr == "weight" and hasattr(module, "cpu_linear"):
                columns = param.shape[1] if param.dim() == 2 else module.input_size_per_partition
                eye = torch.eye(columns, dtype=self.vllm_config.model_config.dtype)
                value = module.cpu_linear(eye, param, None).t().contiguous()  # [out, in]
            else:
                value = param.detach().contiguous().clone()
        return {"dtype": dtype_name(value.dtype), "shape": list(value.shape),
                "data": value.view(torch.uint8).numpy().tobytes()}
