"""`ServedModel.refresh` against an engine client whose weight update fails: the caller
sees the update's own error, and the update is closed so the next refresh can start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from livetrain.vllm_plugin.served import ServedModel
from livetrain.vllm_plugin.settings import PluginSettings
from livetrain.weights import Layout, ParamLayout, ParamSlice


class FailingEngine:
    """The weight-update part of vLLM's engine client, as its worker behaves: a failed
    update_weights ends the update, so finishing it afterwards raises."""

    def __init__(self) -> None:
        self.active = False
        self.calls: list[str] = []

    async def start_weight_update(self) -> None:
        assert not self.active, "start_weight_update called while a weight update is already active"
        self.calls.append("start")
        self.active = True

    async def update_weights(self, request) -> None:
        self.calls.append("update")
        self.active = False
        raise ValueError("the shared copy's file for qkv_proj is gone")

    async def finish_weight_update(self, weight_version=None) -> None:
        self.calls.append("finish")
        if not self.active:
            raise RuntimeError("finish_weight_update called without a matching start_weight_update.")
        self.active = False

    async def reset_prefix_cache(self) -> bool:
        return True


def test_a_failed_weight_update_reports_its_own_error_and_leaves_no_update_open(tmp_path: Path):
    engine = FailingEngine()
    served = ServedModel(engine, PluginSettings(shm_dir=tmp_path / "livetrain-x"))
    served.kind = "shm"
    served.layout = Layout(params={"layers.0.qkv_proj.weight": ParamLayout(
        name="layers.0.qkv_proj.weight", shape=(6, 4), dtype="float32",
        slices=(ParamSlice("layers.0.q_proj.weight", (0, 6), (0, 6)),))},
        hf_shapes={"layers.0.q_proj.weight": (6, 4)})
    for _ in range(2):  # the second refresh can start: nothing was left open
        with pytest.raises(ValueError, match="is gone"):
            asyncio.run(served.refresh(["layers.0.q_proj.weight"], 1))
    assert engine.calls == ["start", "update", "finish"] * 2 and not engine.active
