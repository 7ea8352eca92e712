"""The training worker's request loop: a ZMQ ROUTER socket in front of a session.

A socket thread owns the socket. ``status`` is answered there at once, even while a
step runs; every other operation goes, in arrival order, to the job loop, which runs
in the thread that called :meth:`WorkerServer.serve_forever` (the process's main
thread), so the session sees one request at a time. A request whose
deadline passed while it waited is not run (its caller has already been told it timed
out). Replies travel back over an ``inproc`` socket, since ZMQ sockets must not be
shared by threads. :meth:`WorkerServer.stop` is safe in a signal handler: the running
job finishes first, so a shutdown never interrupts half a step.
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
    not block; the others run one at a time in the job loop.
    """

    def __init__(self, address: str, handlers: dict[str, Handler], max_pending: int = 64) -> None:
        self.address = address
        self.handlers = handlers
        self.max_pending = max_pending
        self._context = zmq.Context()
        self._inproc = f"inproc://replies-{id(self)}"
        self._jobs: queue.Queue[tuple[list[bytes], dict[str, Any]]] = queue.Queue()
        self._stopping = threading.Event()  # a shutdown request arrived: refuse new work
        self._stop = threading.Event()  # leave the loops
        self._running: str | None = None

    def serve_forever(self, orphaned: Callable[[], bool] | None = None) -> None:
        """Bind, run jobs, return after a ``shutdown`` request has been answered, after
        :meth:`stop`, or once ``orphaned()`` (checked 5 times a second) says the owner is gone.

        The sockets are bound here, so a bad address raises in the caller. The job loop
        ends with a sentinel on the reply socket and the socket thread leaves only when
        it gets it: every reply the job loop sent, the last one included, reaches its caller.
        """
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        replies = self._context.socket(zmq.PULL)
        out = self._context.socket(zmq.PUSH)
        try:
            router.bind(self.address)
            replies.bind(self._inproc)
            out.connect(self._inproc)
            log.info("training worker listening on %s", self.address)
            # Each socket is used by one thread only; handing it over at thread start is safe.
            socket_thread = threading.Thread(target=self._serve_socket, args=(router, replies, orphaned),
                                             name="livetrain-socket", daemon=True)
            socket_thread.start()
            try:
                self._run_jobs(out)
            finally:
                self._stop.set()
                out.send_multipart([b""])  # after the last reply: tells the socket thread to stop
                socket_thread.join(timeout=30)
        finally:
            for socket in (out, replies, router):
                socket.close()
            self._context.term()

    def stop(self) -> None:
        """Stop after the running job (if any); safe to call from a signal handler."""
        self._stop.set()

    def _serve_socket(self, router: zmq.Socket, replies: zmq.Socket, orphaned: Callable[[], bool] | None) -> None:
        """Relay replies to callers and dispatch requests until the job loop's sentinel."""
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        while True:
            events = dict(poller.poll(200))
            if replies in events:
                frames = replies.recv_multipart()
                if frames == [b""]:  # the job loop has ended and sent its last reply
                    return
                router.send_multipart(frames)
            if router in events:
                self._dispatch(router, router.recv_multipart())
            if not events and orphaned is not None and not self._stop.is_set() and orphaned():
                log.warning("the process that started the training worker is gone; stopping")
                self._stop.set()

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
        elif self._stopping.is_set() or self._stop.is_set():
            router.send_multipart([*envelope, _shutting_down_reply(message)])
        elif self._jobs.qsize() >= self.max_pending:
            error = WorkerError("the training worker's queue is full; retry later", protocol.UNAVAILABLE,
                                code="queue_full")
            router.send_multipart([*envelope, protocol.encode(protocol.error_reply(message.get("id"), error))])
        else:
            if op == "shutdown":
                self._stopping.set()
            self._jobs.put((envelope, message))

    def _run_jobs(self, out: zmq.Socket) -> None:
        """Run queued requests one at a time until a ``shutdown`` or :meth:`stop`."""
        while not self._stop.is_set():
            try:
                envelope, message = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            self._running = message.get("op")
            reply = self._handle(message)
            self._running = None
            out.send_multipart([*envelope, reply])
            if message.get("op") == "shutdown":
                break
        while True:  # stopped: tell whoever still waits in the queue
            try:
                envelope, message = self._jobs.get_nowait()
            except queue.Empty:
                return
            out.send_multipart([*envelope, _shutting_down_reply(message)])

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


def _shutting_down_reply(message: dict[str, Any]) -> bytes:
    error = WorkerError("the training worker is shutting down", protocol.UNAVAILABLE)
    return protocol.encode(protocol.error_reply(message.get("id"), error))
