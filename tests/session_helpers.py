"""Helpers for the training session, worker and routes tests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from livetrain.train.data import SFTExample

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Short chat exchanges in the JSONL "messages" format.
CHATS = [
    ("What is the capital of France?", "You ask about France's capital. It is Paris."),
    ("Name a primary colour.", "You ask for a primary colour. Red is one."),
    ("How many legs does a spider have?", "You ask about spider legs. A spider has eight."),
    ("What is 2 + 2?", "You ask for a sum. 2 + 2 = 4."),
]


def tiny_dir(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random Llama directory (fp32) with the default model's tokenizer."""
    from tests.tiny_models import write_tiny_model

    write_tiny_model(out, "llama", seed=seed)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def files_digest(model_dir: Path) -> str:
    """sha256 over the bytes of every safetensors file of a directory."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def example(i: int, context_len: int = 12, continuation_len: int = 6) -> SFTExample:
    """A deterministic raw-token example; different ``i`` give different contexts."""
    base = 100 + 37 * i
    return SFTExample(tuple(range(base, base + context_len)),
                      tuple(range(base + 500, base + 500 + continuation_len)))


def wire(ex: SFTExample) -> dict:
    return {"context_ids": list(ex.context_ids), "continuation_ids": list(ex.continuation_ids)}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, body: dict, timeout: float = 300) -> dict:
    """POST a JSON body; the JSON reply (HTTP errors raise)."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


@contextlib.contextmanager
def routes_client(address: str, **routes_options: Any) -> Iterator[tuple[Any, Any]]:
    """(TestClient, TrainingRoutes): the training routes on a plain FastAPI app in front of
    the worker at ``address`` (``routes_options``: `TrainingRoutes`' fields). The client
    addresses the app as 127.0.0.1, as a token-less server must be addressed."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from livetrain.routes import TrainingRoutes, router
    from livetrain.worker.connection import WorkerConnection

    app = FastAPI()
    app.include_router(router)
    with TestClient(app, base_url="http://127.0.0.1:8000") as http:
        routes = TrainingRoutes(WorkerConnection(address), **routes_options)
        routes.install(app.state)
        try:
            yield http, routes
        finally:
            routes.worker.close()
