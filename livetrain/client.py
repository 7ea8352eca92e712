"""Python client of a livetrain server: tokenizes with the model's chat template and
posts token ids to ``/train``, exactly as the served model will see them.

    client = TrainingClient("http://127.0.0.1:8000", admin_token="...")
    client.teach("What is 2 + 2?", "You are asking for a sum. 2 + 2 = 4.")
    client.teach("What is 2 + 2?", "2 + 2 = 4.", rejected="2 + 2 = 5.")   # a correction: ORPO
    client.train_jsonl("examples.jsonl", epochs=1)

Every ``POST`` carries an ``Idempotency-Key`` of its own, and is retried with that key
when the server answers 429, 503 or 504 (or the connection fails): the server runs a
retried request at most once, so a step that timed out but was applied is not applied
again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import httpx

from livetrain.train.data import (Example, PreferenceExample, SFTExample, default_loss, load_jsonl,
                                  parse_record, tokenize_prompt_completion)
from livetrain.train.epochs import TrainingSummary, run_epochs

log = logging.getLogger(__name__)
# Answers after which a request with an idempotency key can be sent again: it ran nothing,
# or it may still run and the server replays its outcome to the retry.
RETRIED_STATUSES = frozenset({429, 503, 504})
RETRIED_CODES = frozenset({"idempotent_request_in_progress"})
MAX_RETRY_WAIT_S = 30.0


class LivetrainError(RuntimeError):
    """The server refused or failed a request (OpenAI error fields, HTTP status, request id),
    or could not be reached (``status`` None)."""

    def __init__(self, status: int | None, message: str, type: str | None = None, code: str | None = None,
                 param: str | None = None, request_id: str | None = None) -> None:
        super().__init__((f"HTTP {status}: " if status is not None else "") + message
                         + (f" (request {request_id})" if request_id else ""))
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.request_id = code, param, request_id


class ServerUnreachable(LivetrainError):
    """Nothing answered: nothing listens at the URL, or the connection failed on every try."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class TrainingClient:
    """Client of the training routes of one server.

    ``tokenizer``: a Hugging Face tokenizer or a path to load one from; by default the
    tokenizer of the served model directory (read from ``GET /train/status``, so the
    client must then run on the server's machine). ``http_client``: an ``httpx.Client``
    to use instead of a new one (tests pass FastAPI's ``TestClient``). ``retries``: how
    many times a request is sent again after a retryable answer (see the module).
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, admin_token: str | None = None,
                 tokenizer: Any = None, timeout_s: float = 330.0,
                 http_client: httpx.Client | None = None, retries: int = 4) -> None:
        self._headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self.retries = retries
        self._http = http_client or httpx.Client(base_url=base_url, timeout=timeout_s)
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None or isinstance(self._tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            source = self._tokenizer or self.status()["model_dir"]
            self._tokenizer = AutoTokenizer.from_pretrained(Path(source))
        return self._tokenizer

    # ---- training -----------------------------------------------------------------------

    def teach(self, prompt: str | list[dict], completion: str | list[dict], *,
              rejected: str | list[dict] | None = None, system: str | None = None,
              **options: Any) -> dict[str, Any]:
        """One step on one chat exchange: ``prompt`` (user turn) answered by ``completion``.

        ``rejected``: an answer that was wrong (the model's own, say): then the step is a
        preference pair, ``completion`` over ``rejected``, and its loss ORPO unless
        ``loss`` says otherwise. Strings become chat messages, so the model learns the
        answer in the form it is served. ``options``: the fields of ``POST /train``
        (loss, lr, dry_run, ...).
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        if rejected is None:
            example = tokenize_prompt_completion(self.tokenizer, messages, _assistant_turn(completion))
        else:
            example = parse_record({"prompt": messages, "chosen": _assistant_turn(completion),
                                    "rejected": _assistant_turn(rejected)}, self.tokenizer)
        return self.train([example], **options)

    def train(self, examples: Iterable[Example | dict], *, loss: str | None = None,
              **options: Any) -> dict[str, Any]:
        """One optimizer step on a batch. ``examples``: ``SFTExample``/``PreferenceExample``
        or records in any JSONL training format. ``loss`` defaults to ``sft``, or ``orpo``
        for preference pairs."""
        parsed = [ex if isinstance(ex, (SFTExample, PreferenceExample)) else parse_record(ex, self._tokenizer_for(ex))
                  for ex in examples]
        loss = loss or default_loss(parsed)
        body = {"examples": [_wire(ex) for ex in parsed], "loss": loss, **options}
        return self._request("POST", "/train", body)

    def train_jsonl(self, path: str | os.PathLike, *, epochs: int = 1, batch_size: int = 1,
                    progress: bool = True, **options: Any) -> TrainingSummary:
        """Post a JSONL training file, batch by batch, with a progress bar."""
        examples = load_jsonl(path, self.tokenizer)
        return run_epochs(examples, lambda batch: self.train(batch, **options), epochs=epochs,
                          batch_size=batch_size, progress=progress, desc=f"train {Path(path).name}")

    def logprobs(self, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> dict[str, Any]:
        """Per-token log-probs of the continuation under the live weights, and their sum."""
        return self._request("POST", "/train/logprobs", {"context_ids": list(context_ids),
                                                         "continuation_ids": list(continuation_ids)})

    # ---- state --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/train/status")

    def checkpoint(self) -> dict[str, Any]:
        """Sync the live weights into the model directory now."""
        return self._request("POST", "/checkpoint", {})

    def generations(self) -> list[dict[str, Any]]:
        return self._request("GET", "/checkpoint")["generations"]

    def rollback(self, generation: int) -> dict[str, Any]:
        return self._request("POST", "/rollback", {"generation": generation})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "TrainingClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tokenizer_for(self, record: Any) -> Any:
        raw = isinstance(record, dict) and "context_ids" in record
        return None if raw else self.tokenizer

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = dict(self._headers)
        if method == "POST":
            headers["Idempotency-Key"] = uuid.uuid4().hex  # one per logical request; retries reuse it
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, json=body, headers=headers)
            except httpx.TransportError as exc:
                # Nothing listening on the first try: a wrong URL or a server not started.
                if attempt == self.retries or (attempt == 0 and isinstance(exc, httpx.ConnectError)):
                    raise ServerUnreachable(f"cannot reach {self._http.base_url} ({type(exc).__name__}: {exc}); "
                                            "is `livetrain serve` running there?") from exc
                why, wait_s = f"{type(exc).__name__}: {exc}", min(2.0 ** attempt, MAX_RETRY_WAIT_S)
            else:
                if response.is_success:
                    return response.json()
                error = _error(response)
                if attempt == self.retries or not (response.status_code in RETRIED_STATUSES
                                                   or error.code in RETRIED_CODES):
                    raise error
                why, wait_s = f"HTTP {response.status_code}: {error.message}", _retry_after(response, attempt)
            attempt += 1
            log.warning("%s %s: %s; sending it again in %.0f s with the same idempotency key (retry %d of %d)",
                        method, path, why, wait_s, attempt, self.retries)
            time.sleep(wait_s)


def _error(response: httpx.Response) -> LivetrainError:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"message": response.text or response.reason_phrase}
    return LivetrainError(response.status_code, error.get("message", ""), error.get("type"),
                          error.get("code"), error.get("param"), response.headers.get("x-request-id"))


def _retry_after(response: httpx.Response, attempt: int) -> float:
    """The server's ``Retry-After`` (seconds), else an exponential backoff; capped."""
    try:
        wait_s = float(response.headers["retry-after"])
    except (KeyError, ValueError):
        wait_s = 2.0 ** attempt
    return min(max(wait_s, 0.0), MAX_RETRY_WAIT_S)


def _assistant_turn(answer: str | list[dict]) -> list[dict]:
    return [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)


def _wire(example: Example) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(example).items() if v is not None}
