"""Weights shared between vLLM and the training worker: handles, layouts, views. Imports no vLLM."""

from livetrain.weights.handles import (CudaIpcHandle, HandleError, SharedMemoryHandle, WeightHandle,
                                       export_cuda_tensor, handle_from_dict, map_handle)
from livetrain.weights.layout import Layout, LayoutError, ParamLayout, ParamSlice
from livetrain.weights.shared_copy import (SharedCopyError, create_shared_copy, map_handles,
                                           open_shared_copy, publish_handles, read_manifest, remove_shared_copy)
from livetrain.weights.views import attach_views, build_skeleton, hf_views, model_on_views

__all__ = [
    "CudaIpcHandle", "HandleError", "Layout", "LayoutError", "ParamLayout", "ParamSlice", "SharedCopyError",
    "SharedMemoryHandle", "WeightHandle", "attach_views", "build_skeleton",
    "create_shared_copy", "export_cuda_tensor", "handle_from_dict", "hf_views", "map_handle", "map_handles",
    "model_on_views", "open_shared_copy", "publish_handles", "read_manifest", "remove_shared_copy",
]
