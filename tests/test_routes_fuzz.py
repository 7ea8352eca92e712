"""Fuzzing the training routes from their own OpenAPI schema: whatever the body, the
answer is never a 5xx, every refusal has OpenAI's error shape, and a refused request
leaves the served weights bit-identical.

Bodies come from each route's documented request schema, from plausible bodies that
pass its cross-field rules (these train, read log-probs, sync and roll back for real) and
from arbitrary JSON and bytes. A caller's own
``timeout_s`` is kept long: a deadline the caller chose is answered with 504 by design.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from livetrain.routes import router
from livetrain.weights import open_shared_copy
from tests.test_routes_bad_input import AUTH, served, weights_digest  # noqa: F401  (served: a fixture)

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def documented_bodies() -> dict[str, dict]:
    """POST path -> the JSON schema of its body, from the routes' OpenAPI document."""
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(router)
    paths = app.openapi()["paths"]
    return {path: ops["post"]["requestBody"]["content"]["application/json"]["schema"]
            for path, ops in paths.items() if "requestBody" in ops.get("post", {})}


BODIES = documented_bodies()
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["examples", "context_ids", "continuation_ids", "chosen_ids", "rejected_ids", "loss",
                         "lr", "generation", "dry_run", "x"]), inner, max_size=4),
    max_leaves=12)


# Bodies that pass the schema's cross-field rules too (one of continuation_ids or a
# chosen/rejected pair), with ids in the vocabulary, so that requests reach the step.
TOKENS = st.lists(st.integers(0, 300), min_size=1, max_size=12)
EXAMPLE = (st.fixed_dictionaries({"context_ids": TOKENS, "continuation_ids": TOKENS})
           | st.fixed_dictionaries({"context_ids": TOKENS, "chosen_ids": TOKENS, "rejected_ids": TOKENS}))
PLAUSIBLE = {
    "/train": st.fixed_dictionaries(
        {"examples": st.lists(EXAMPLE, min_size=1, max_size=3)},
        optional={"loss": st.sampled_from(["sft", "orpo", "dpo"]), "lr": st.floats(1e-6, 1.0),
                  "dry_run": st.booleans(), "max_grad_norm": st.none() | st.floats(1e-3, 10.0),
                  "max_update_norm": st.none() | st.floats(1e-3, 10.0), "orpo_lambda": st.floats(0, 2),
                  "dpo_beta": st.floats(1e-3, 2)}),
    "/train/logprobs": st.fixed_dictionaries({"context_ids": TOKENS, "continuation_ids": TOKENS}),
    "/checkpoint": st.just({}),
    "/rollback": st.fixed_dictionaries({"generation": st.integers(0, 3)}),
}


def test_every_training_route_documents_its_body():
    assert set(BODIES) == {"/train", "/train/logprobs", "/checkpoint", "/rollback"}
    assert "examples" in BODIES["/train"]["required"]


def long_deadline(body: object) -> object:
    if isinstance(body, dict) and isinstance(body.get("timeout_s"), (int, float)):
        return {**body, "timeout_s": 60}
    return body


def check_answer(served, path: str, payload: bytes) -> None:
    http, _, shared, _ = served
    _, tensors = open_shared_copy(shared)
    before = weights_digest(tensors)
    response = http.post(path, content=payload, headers=AUTH)
    assert response.status_code < 500, (path, payload[:300], response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        assert {"param", "code"} <= set(error)
        assert weights_digest(tensors) == before, (path, payload[:300], response.text[:300])


@pytest.mark.parametrize("path", sorted(BODIES))
@FUZZ
@given(data=st.data())
def test_schema_bodies_never_get_a_5xx(served, path, data):
    body = data.draw(from_schema(BODIES[path]) | PLAUSIBLE[path] | ANY_JSON, label="body")
    check_answer(served, path, json.dumps(long_deadline(body)).encode())


@FUZZ
@given(payload=st.binary(max_size=64), path=st.sampled_from(sorted(BODIES)))
def test_arbitrary_bytes_never_get_a_5xx(served, payload, path):
    check_answer(served, path, payload)
