"""Request bodies of the training routes, and OpenAI-shaped errors."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

TokenId = Annotated[StrictInt, Field(ge=0)]
TokenIds = list[TokenId]
Seconds = Field(default=300.0, gt=0, le=3600, description="wait at most this long for the worker")


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one request to the training routes may ask for; more gets a 4xx.

    ``max_body_bytes``: the JSON body (413 beyond). ``body_timeout_s``: the most time
    the body may take to arrive after the headers (408 beyond). ``max_examples``: examples per
    ``/train``. ``max_tokens_per_example``: context + continuation (or + chosen +
    rejected). ``max_tokens_per_request``: summed over the request's examples (the
    step's activation memory grows with it).
    """

    max_body_bytes: int = 8 * 2**20
    body_timeout_s: float = 60.0
    max_examples: int = 64
    max_tokens_per_example: int = 8192
    max_tokens_per_request: int = 32768

    def check(self, examples: list[list[TokenIds]]) -> str | None:
        """Why ``examples`` (each a list of its id lists) exceed the limits, or None."""
        if len(examples) > self.max_examples:
            return (f"{len(examples)} examples in one request; the limit is {self.max_examples}: "
                    "split them over several requests")
        total = 0
        for i, parts in enumerate(examples):
            tokens = sum(len(ids) for ids in parts)
            if tokens > self.max_tokens_per_example:
                return (f"examples[{i}] has {tokens} tokens; the limit is {self.max_tokens_per_example} "
                        "per example: shorten its context")
            total += tokens
        if total > self.max_tokens_per_request:
            return (f"the request has {total} tokens; the limit is {self.max_tokens_per_request} per request: "
                    "split the examples over several requests")
        return None


class _Body(BaseModel):
    # Strict: a value of the wrong JSON type ("lr": "1e-4", "dry_run": "yes") is refused
    # rather than coerced (an integer still counts as a number).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class ExampleBody(_Body):
    """``{context_ids, continuation_ids}`` (SFT) or ``{context_ids, chosen_ids, rejected_ids}``."""

    context_ids: TokenIds = Field(min_length=1)
    continuation_ids: TokenIds | None = None
    chosen_ids: TokenIds | None = None
    rejected_ids: TokenIds | None = None
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "ExampleBody":
        pair = self.chosen_ids is not None or self.rejected_ids is not None
        if (self.continuation_ids is None) == (not pair):
            raise ValueError("give continuation_ids, or chosen_ids and rejected_ids (not both)")
        if pair and (self.chosen_ids is None or self.rejected_ids is None):
            raise ValueError("a preference pair needs both chosen_ids and rejected_ids")
        return self

    def token_lists(self) -> list[TokenIds]:
        return [ids for ids in (self.context_ids, self.continuation_ids, self.chosen_ids, self.rejected_ids)
                if ids is not None]


class TrainBody(_Body):
    examples: list[ExampleBody] = Field(min_length=1)
    loss: Literal["sft", "orpo", "dpo"] = "sft"
    lr: float | None = Field(default=None, gt=0, le=1)
    dry_run: bool = False
    max_grad_norm: float | None = Field(default=None, gt=0)
    max_update_norm: float | None = Field(default=None, gt=0)
    orpo_lambda: float | None = Field(default=None, ge=0)
    dpo_beta: float | None = Field(default=None, gt=0)
    timeout_s: float = Seconds

    def step_options(self) -> dict[str, Any]:
        """The fields of the step's options that the request set. ``null`` means the
        default, except for the two bounds, where it means no bound (no clipping)."""
        fields = self.model_dump(exclude={"examples", "timeout_s"}, exclude_unset=True)
        return {name: value for name, value in fields.items()
                if value is not None or name in ("max_grad_norm", "max_update_norm")}


class LogprobsBody(_Body):
    context_ids: TokenIds = Field(min_length=1)
    continuation_ids: TokenIds = Field(min_length=1)
    timeout_s: float = Seconds


class CheckpointBody(_Body):
    timeout_s: float = Field(default=600.0, gt=0, le=3600)


class RollbackBody(_Body):
    generation: StrictInt = Field(ge=0)
    timeout_s: float = Field(default=600.0, gt=0, le=3600)


def error_response(status: int, message: str, type: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def validation_error_response(exc: ValidationError) -> JSONResponse:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    where = f"{param}: " if param else ""
    return error_response(400, f"{where}{first['msg']}", "invalid_request_error", param=param)
