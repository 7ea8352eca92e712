"""vLLM's engine in this process with livetrain plugged in: for tests, benchmarks and scripts.

The same worker extension, weight-transfer backend and `ServedModel` as the server,
without HTTP. The engine runs on a private event loop; `run` drives a coroutine on it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import torch

from livetrain.vllm_plugin.extension import QUALNAME
from livetrain.vllm_plugin.launcher import PLUGIN_NAME
from livetrain.vllm_plugin.settings import BACKEND, DEFAULT_TRAIN_MODULES, PluginSettings


class InProcessEngine:
    """``AsyncLLM`` on ``model_dir`` (eager, CPU KV cache ``kv_cache_gib``), and, unless
    ``plain``, livetrain's `ServedModel` on a fresh shared copy in ``/dev/shm``."""

    def __init__(self, model_dir: str | Path, cpu_mode: str = "reload", train_modules: str = DEFAULT_TRAIN_MODULES,
                 plain: bool = False, kv_cache_gib: float = 1.0, max_model_len: int = 512) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from livetrain.vllm_plugin.served import ServedModel

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")
        plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
        if PLUGIN_NAME not in plugins:  # the engine's processes inherit this: the general plugin loads there
            os.environ["VLLM_PLUGINS"] = ",".join(plugins + [PLUGIN_NAME])
        self.loop = asyncio.new_event_loop()
        self.shm_dir = Path(f"/dev/shm/livetrain-engine-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        extension = {} if plain else {"worker_extension_cls": QUALNAME,
                                      "weight_transfer_config": {"backend": BACKEND}}
        args = AsyncEngineArgs(model=str(model_dir), enforce_eager=True, max_model_len=max_model_len, **extension)
        self.engine = self.run(self._make(AsyncLLM, args))
        self.served = None
        if not plain:
            self.served = ServedModel(self.engine, PluginSettings(shm_dir=self.shm_dir, cpu_mode=cpu_mode,
                                                                  train_modules=train_modules))
            self.run(self.served.start())

    @staticmethod
    async def _make(cls, args):
        return cls.from_engine_args(args)

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    async def complete(self, prompt: str, max_tokens: int, greedy: bool = True,
                       ignore_eos: bool = False) -> tuple[list[int], list[float]]:
        """One completion: (token ids, their log-probs)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0 if greedy else 1.0, logprobs=0,
                                ignore_eos=ignore_eos)
        final = None
        async for output in self.engine.generate(prompt, params, uuid.uuid4().hex):
            final = output
        completion = final.outputs[0]
        logprobs = [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)]
        return list(completion.token_ids), logprobs

    def greedy(self, prompt: str, max_tokens: int = 6) -> tuple[list[int], list[float]]:
        """Greedy token ids and their log-probs."""
        return self.run(self.complete(prompt, max_tokens))

    def served_param(self, name: str) -> torch.Tensor:
        """What vLLM serves for one parameter, read back through its own kernel."""
        value = self.run(self.served.read_param(name))
        return torch.frombuffer(bytearray(value["data"]), dtype=getattr(torch, value["dtype"])).view(value["shape"])

    def close(self) -> None:
        from livetrain.weights import remove_shared_copy

        self.engine.shutdown()
        pending = asyncio.all_tasks(self.loop)  # the engine's output handlers
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()
        if self.served is not None:
            remove_shared_copy(self.shm_dir)
        self.engine = self.served = None  # let AsyncLLM's finaliser run now, not at interpreter exit
