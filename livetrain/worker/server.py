"""The training worker's request loop: a ZMQ ROUTER socket in front of a session.

One thread owns the socket. ``status`` is answered at once, even while a step runs;
every other operation goes, in arrival order, to a single job thread, so the session
sees one request at a time. A request whose deadline passed while it waited is not
run (its caller has already been told it timed out). Replies travel back from the job
thread over an ``inproc`` socket, since ZMQ sockets must not be shared by threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

import zmq

from livetrain.worker import protocol
from livetrain.worker.protocol import WorkerError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class WorkerServer:
    """Serves ``handlers`` (one per operation) on ``address`` until ``shutdown``.

    ``handlers``: op name -> function of the request's args returning the result dict
    (raise ``WorkerError`` to refuse). ``status`` runs on the socket thread and must
    not block; the others run one at a time on the job thread.
    """

    def __init__(self, address: str, handlers: dict[str, Handler], max_pending: int = 64) -> None:
        self.address = address
        self.handlers = handlers
        self.max_pending = max_pending
        self._context = zmq.Context()
        self._inproc = f"inproc://replies-{id(self)}"
        self._jobs: queue.Queue[tuple[list[bytes], dict[str, Any]] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._running: str | None = None

    def serve_forever(self, orphaned: Callable[[], bool] | None = None) -> None:
        """Bind, answer requests, return after a ``shutdown`` request has been answered
        (or, checked every second, once ``orphaned()`` says the owner is gone)."""
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        router.bind(self.address)
        replies = self._context.socket(zmq.PULL)
        replies.bind(self._inproc)
        job_thread = threading.Thread(target=self._run_jobs, name="livetrain-jobs", daemon=True)
        job_thread.start()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        log.info("training worker listening on %s", self.address)
        try:
            while True:
                events = dict(poller.poll(1000))
                if not events and orphaned is not None and orphaned():
                    log.warning("the process that started the training worker is gone; stopping")
                    break
                if replies in events:
                    frames = replies.recv_multipart()
                    if frames == [b""]:  # the job thread finished a shutdown
                        break
                    router.send_multipart(frames)
                if router in events:
                    self._dispatch(router, router.recv_multipart())
        finally:
            self._jobs.put(None)
            job_thread.join(timeout=30)
            router.close()
            replies.close()
            self._context.term()

    def load(self) -> dict[str, Any]:
        """How busy the worker is: the operation running now and how many wait."""
        return {"running": self._running, "queued": self._jobs.qsize()}

    def _dispatch(self, router: zmq.Socket, frames: list[bytes]) -> None:
        envelope, payload = frames[:-1], frames[-1]
        try:
            message = protocol.decode(payload)
        except ValueError as exc:
            reply = protocol.error_reply(None, WorkerError(f"undecodable request: {exc}",
                                                           protocol.INVALID_REQUEST))
            router.send_multipart([*envelope, protocol.encode(reply)])
            return
        op = message.get("op")
        if op == "status":
            router.send_multipart([*envelope, self._handle(message)])
        elif self._stopping.is_set():
            error = WorkerError("the training worker is shutting down", protocol.UNAVAILABLE)
            router.send_multipart([*envelope, protocol.encode(protocol.error_reply(message.get("id"), error))])
        elif self._jobs.qsize() >= self.max_pending:
            error = WorkerError("the training worker's queue is full; retry later", protocol.UNAVAILABLE,
                                code="queue_full")
            router.send_multipart([*envelope, protocol.encode(protocol.error_reply(message.get("id"), error))])
        else:
            if op == "shutdown":
                self._stopping.set()
            self._jobs.put((envelope, message))

    def _run_jobs(self) -> None:
        out = self._context.socket(zmq.PUSH)
        out.connect(self._inproc)
        try:
            while (job := self._jobs.get()) is not None:
                envelope, message = job
                self._running = message.get("op")
                reply = self._handle(message)
                self._running = None
                # An empty last frame after a shutdown's reply tells the loop to stop.
                out.send_multipart([*envelope, reply])
                if message.get("op") == "shutdown":
                    out.send_multipart([b""])
                    return
        finally:
            out.close(linger=1000)

    def _handle(self, message: dict[str, Any]) -> bytes:
        """Run one request; the encoded reply (an error reply if anything failed)."""
        request_id = message.get("id")
        try:
            return protocol.encode(protocol.ok_reply(request_id, self._result(message)))
        except WorkerError as exc:
            return protocol.encode(protocol.error_reply(request_id, exc))
        except Exception as exc:  # a failed job must not take the worker down
            log.exception("%s request %s failed", message.get("op"), request_id)
            return protocol.encode(protocol.error_reply(request_id, WorkerError(f"{type(exc).__name__}: {exc}")))

    def _result(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            raise WorkerError(f"unknown operation {op!r}", protocol.INVALID_REQUEST, param="op")
        deadline = message.get("deadline")
        if deadline is not None and time.time() > deadline:
            raise WorkerError(f"request {message.get('id')} waited past its deadline and was not run",
                              protocol.TIMEOUT)
        args = message.get("args") or {}
        if not isinstance(args, dict):
            raise WorkerError("args must be an object", protocol.INVALID_REQUEST, param="args")
        return handler(args)
