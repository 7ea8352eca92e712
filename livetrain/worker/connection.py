"""Talking to the training worker: an asyncio connection for the routes, a blocking call
for launchers and tests. Both are ZMQ DEALER sockets, so many requests can be in flight
on one connection and replies are matched to requests by id."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import zmq
import zmq.asyncio

from livetrain.worker import protocol
from livetrain.worker.protocol import WorkerError

log = logging.getLogger(__name__)


def _timeout_error(op: str, request_id: str, timeout_s: float) -> WorkerError:
    return WorkerError(f"the training worker did not answer {op} request {request_id} within "
                       f"{timeout_s:g} s; if it was queued it will not run, if it was running "
                       "it may still complete (see GET /train/status)", protocol.TIMEOUT,
                       code="worker_timeout")


class WorkerConnection:
    """An asyncio client of one training worker; create and use it on one event loop.

    ``on_late_reply``: called (on the event loop) with the result of a request whose
    caller had already timed out, e.g. a step that was applied after its 504.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.on_late_reply: Callable[[dict[str, Any]], None] | None = None
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._receiver: asyncio.Task[None] | None = None

    async def call(self, op: str, args: dict[str, Any] | None = None, *, timeout_s: float = 30.0,
                   request_id: str | None = None) -> dict[str, Any]:
        """Send one request and wait for its result; raises ``WorkerError``.

        The worker is told the deadline, so a request still queued when it passes is
        dropped there instead of running after its caller gave up.
        """
        message = protocol.request(op, args, request_id=request_id, deadline=time.time() + timeout_s)
        if self._receiver is None or self._receiver.done():
            self._receiver = asyncio.get_running_loop().create_task(self._receive())
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message["id"]] = future
        try:
            await self._socket.send(protocol.encode(message))
            reply = await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise _timeout_error(op, message["id"], timeout_s) from None
        finally:
            self._pending.pop(message["id"], None)
        if not reply.get("ok"):
            raise WorkerError.from_dict(reply.get("error") or {})
        return reply["result"]

    async def _receive(self) -> None:
        while True:
            reply = protocol.decode(await self._socket.recv())
            future = self._pending.get(reply.get("id"))
            if future is not None and not future.done():
                future.set_result(reply)
            elif reply.get("ok") and self.on_late_reply is not None:
                self.on_late_reply(reply["result"])
            else:
                log.info("dropping a late reply for request %s", reply.get("id"))

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
        self._socket.close()
        self._context.term()


def call_worker(address: str, op: str, args: dict[str, Any] | None = None, *,
                timeout_s: float = 30.0, context: zmq.Context | None = None) -> dict[str, Any]:
    """One blocking request on a fresh socket; returns the result or raises ``WorkerError``."""
    context = context or zmq.Context.instance()
    message = protocol.request(op, args, deadline=time.time() + timeout_s)
    with context.socket(zmq.DEALER) as socket:
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)
        socket.send(protocol.encode(message))
        deadline = time.monotonic() + timeout_s
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            if not socket.poll(left_ms):
                break
            reply = protocol.decode(socket.recv())
            if reply.get("id") == message["id"]:
                if not reply.get("ok"):
                    raise WorkerError.from_dict(reply.get("error") or {})
                return reply["result"]
    raise _timeout_error(op, message["id"], timeout_s)
