"""The layout: how vLLM's parameters are made of Hugging Face tensors.

vLLM stores some weights merged (``qkv_proj`` = q | k | v rows, ``gate_up_proj`` =
gate | up), pads the vocabulary, and keeps tied embeddings as one tensor. A `Layout`
says, for every vLLM parameter, which rows of it hold which rows of which Hugging Face
tensor. It is derived on the vLLM side (``livetrain.vllm_plugin.layout``) and travels
as plain data (`Layout.to_dict`), so this module knows nothing of vLLM.

All slices are along dim 0, the only dimension vLLM merges or pads at tensor-parallel
size 1; ``hf_rows`` is kept separate from ``rows`` so that a tensor-parallel shard
(rows of the full Hugging Face tensor) fits the same type.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


class LayoutError(ValueError):
    """A layout does not fit the tensors or model it is applied to."""


@dataclass(frozen=True)
class ParamSlice:
    """Rows ``rows`` of a vLLM parameter hold rows ``hf_rows`` of Hugging Face tensor ``hf_name``."""

    hf_name: str
    rows: tuple[int, int]
    hf_rows: tuple[int, int]

    def __post_init__(self) -> None:
        if self.rows[1] - self.rows[0] != self.hf_rows[1] - self.hf_rows[0] or self.rows[0] < 0:
            raise LayoutError(f"{self.hf_name}: rows {self.rows} and hf_rows {self.hf_rows} differ in length")


@dataclass(frozen=True)
class ParamLayout:
    """One vLLM parameter: its full (unpacked) shape and dtype and the slices it is made of.

    Rows no slice covers are padding (the vocabulary's, for instance): never trained,
    never read as Hugging Face weights.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    slices: tuple[ParamSlice, ...]

    def __post_init__(self) -> None:
        covered = sorted(s.rows for s in self.slices)
        for (_, end), (start, _) in zip(covered, covered[1:]):
            if start < end:
                raise LayoutError(f"{self.name}: slices overlap")
        if covered and covered[-1][1] > self.shape[0]:
            raise LayoutError(f"{self.name}: slices reach row {covered[-1][1]} of {self.shape[0]}")

    @property
    def is_merged(self) -> bool:
        return len(self.slices) > 1


@dataclass(frozen=True)
class Layout:
    """vLLM parameter name -> `ParamLayout`, plus Hugging Face shapes and tied names.

    ``hf_shapes`` holds the full shape of every Hugging Face tensor a slice refers to;
    ``tied`` maps a Hugging Face name that is not stored (``lm_head.weight``) to the one
    that is (``model.embed_tokens.weight``).
    """

    params: dict[str, ParamLayout]
    hf_shapes: dict[str, tuple[int, ...]]
    tied: dict[str, str] = field(default_factory=dict)
    _owner_of: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for param in self.params.values():
            for s in param.slices:
                if s.hf_name not in self.hf_shapes:
                    raise LayoutError(f"{param.name}: no shape for Hugging Face tensor {s.hf_name}")
                if s.hf_name in seen and seen[s.hf_name] != param.name:
                    raise LayoutError(f"{s.hf_name} appears in both {seen[s.hf_name]} and {param.name}")
                seen[s.hf_name] = param.name
        for alias, target in self.tied.items():
            if target not in seen:
                raise LayoutError(f"tied {alias} -> {target}: {target} is in no vLLM parameter")
        self._owner_of.update(seen)  # Hugging Face name -> vLLM parameter

    def owner_of(self, hf_name: str) -> str:
        """The vLLM parameter that holds Hugging Face tensor ``hf_name`` (tied names resolved)."""
        hf_name = self.tied.get(hf_name, hf_name)
        try:
            return self._owner_of[hf_name]
        except KeyError:
            raise LayoutError(f"{hf_name} is in no vLLM parameter") from None

    def params_to_refresh(self, changed_hf_names: Iterable[str]) -> list[str]:
        """The WHOLE vLLM parameters that contain any changed Hugging Face tensor, in layout order.

        A merged parameter is always refreshed whole: vLLM's in-place reload fills the rows
        it was not sent with uninitialised memory.
        """
        wanted = {self.owner_of(name) for name in changed_hf_names}
        return [name for name in self.params if name in wanted]

    def hf_names(self) -> list[str]:
        """Every stored Hugging Face tensor, in layout order (tied aliases excluded)."""
        return [s.hf_name for p in self.params.values() for s in p.slices]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON- and msgpack-safe) that `from_dict` reads back."""
        return {
            "params": [
                {"name": p.name, "shape": list(p.shape), "dtype": p.dtype,
                 "slices": [{"hf_name": s.hf_name, "rows": list(s.rows), "hf_rows": list(s.hf_rows)}
                            for s in p.slices]}
                for p in self.params.values()
            ],
            "hf_shapes": {name: list(shape) for name, shape in self.hf_shapes.items()},
            "tied": dict(self.tied),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        params = {}
        for p in data["params"]:
            slices = tuple(ParamSlice(s["hf_name"], tuple(s["rows"]), tuple(s["hf_rows"])) for s in p["slices"])
            params[p["name"]] = ParamLayout(p["name"], tuple(p["shape"]), p["dtype"], slices)
        return cls(params, {k: tuple(v) for k, v in data["hf_shapes"].items()}, dict(data.get("tied", {})))
