"""The vLLM side of livetrain: the only package that imports vLLM.

* `extension.LivetrainWorkerExtension` (``--worker-extension-cls``): layout, weight export, CPU modes.
* `transfer.SharedCopyTransferEngine`: the ``livetrain_shm`` weight-transfer backend (CPU reload mode).
* `plugins`: the ``vllm.general_plugins`` and ``vllm.endpoint_plugins`` entries.
* `served.ServedModel`: what the routes call in the API-server process.
* `launcher`: the vLLM command line and environment; starting and stopping vLLM's process group.
* `supervision`: vLLM stops when the `livetrain serve` that started it is gone.
"""
