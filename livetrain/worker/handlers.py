"""The training worker's operations (see :mod:`livetrain.worker.protocol`) on a session:
each takes a request's ``args`` and returns its result, or raises ``WorkerError``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator

from livetrain.checkpoint import GenerationNotFoundError
from livetrain.session import TrainingSession
from livetrain.train.data import DataFormatError, Example, SFTExample, parse_record
from livetrain.train.step import InvalidExampleError, StepOptions
from livetrain.worker import protocol
from livetrain.worker.protocol import WorkerError
from livetrain.worker.server import Handler


def session_handlers(session: TrainingSession, server_status: Handler,
                     close: Callable[[], None] | None = None) -> dict[str, Handler]:
    """The worker's operations (see :mod:`livetrain.worker.protocol`) on ``session``;
    ``shutdown`` calls ``close`` (default: ``session.close``)."""

    def train(args: dict[str, Any]) -> dict[str, Any]:
        examples = _examples(args.get("examples"))
        options = _step_options(args.get("options") or {})
        with _invalid_as_request_error():
            return session.train(examples, options, request_id=args.get("request_id")).to_dict()

    def logprobs(args: dict[str, Any]) -> dict[str, Any]:
        example = _examples([args])[0]
        if not isinstance(example, SFTExample):
            raise WorkerError("give context_ids and continuation_ids", protocol.INVALID_REQUEST)
        with _invalid_as_request_error():  # the session validates the ids against the model
            values = session.logprobs(example.context_ids, example.continuation_ids)
        return {"logprobs": values, "sum": sum(values), "tokens": len(values),
                "weights_version": session.weights_version}

    def status(args: dict[str, Any]) -> dict[str, Any]:
        return {**session.status(), **server_status(args), "pid": os.getpid()}

    def rollback(args: dict[str, Any]) -> dict[str, Any]:
        to = args.get("generation")
        if not isinstance(to, int) or isinstance(to, bool):
            raise WorkerError("generation must be an integer", protocol.INVALID_REQUEST, param="generation")
        reachable = session.directory.reachable()
        if not session.dirty and to not in reachable:
            # Refused before rollback's own sync, so a bad request leaves no trace in the directory.
            raise WorkerError(f"cannot roll back to generation {to}: the generations that can be restored "
                              f"are {sorted(reachable)} (GET /checkpoint lists them)", protocol.NOT_FOUND,
                              param="generation")
        try:
            return session.rollback(to)
        except GenerationNotFoundError as exc:
            raise WorkerError(str(exc), protocol.NOT_FOUND, param="generation") from None

    def shutdown(args: dict[str, Any]) -> dict[str, Any]:
        (close or session.close)()
        return {"closed": True, "last_generation": session.last_generation}

    return {"train": train, "logprobs": logprobs, "status": status,
            "checkpoint": lambda args: session.sync(),
            "generations": lambda args: {"generations": session.generations()},
            "rollback": rollback, "shutdown": shutdown}


def _examples(records: Any) -> list[Example]:
    if not isinstance(records, list) or not records:
        raise WorkerError("examples must be a non-empty list", protocol.INVALID_REQUEST, param="examples")
    examples = []
    for i, record in enumerate(records):
        try:
            examples.append(parse_record(record))
        except DataFormatError as exc:
            raise WorkerError(f"examples[{i}].{exc.field}: {exc.reason}", protocol.INVALID_REQUEST,
                              param=f"examples[{i}].{exc.field}") from None
    return examples


def _step_options(fields: dict[str, Any]) -> StepOptions:
    known = {f.name for f in dataclasses.fields(StepOptions)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise WorkerError(f"unknown step option(s): {', '.join(unknown)}", protocol.INVALID_REQUEST,
                          param=unknown[0])
    return StepOptions(**fields)


@contextlib.contextmanager
def _invalid_as_request_error() -> Iterator[None]:
    try:
        yield
    except InvalidExampleError as exc:
        raise WorkerError(str(exc), protocol.INVALID_REQUEST, param="examples") from None


