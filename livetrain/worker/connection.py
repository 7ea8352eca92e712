"""Talking to the training worker: an asyncio connection for the routes, a blocking call
for launchers and tests. Both are ZMQ DEALER sockets, so many requests can be in flight
on one connection and replies are matched to requests by id.

The asyncio connection knows whether the worker is there (ZMQ's socket monitor reports
each completed handshake and each disconnect): while it is not (starting, or being
restarted by the supervisor) requests fail at once with ``service_unavailable_error``,
and a request in flight when the worker goes away fails with it too, rather than
waiting for its timeout or being delivered to the next worker."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from livetrain.worker import protocol
from livetrain.worker.protocol import WorkerError

log = logging.getLogger(__name__)
CONNECT_GRACE_S = 1.0  # a request waits this long for a handshake before it is refused
LIVENESS_POLL_S = 0.25
SEND_TIMEOUT_S = 5.0  # a connected worker takes a request at once; longer means it is stuck


def _timeout_error(op: str, request_id: str, timeout_s: float) -> WorkerError:
    return WorkerError(f"the training worker did not answer {op} request {request_id} within "
                       f"{timeout_s:g} s; if it was queued it will not run, if it was running "
                       "it may still complete (see GET /train/status)", protocol.TIMEOUT,
                       code="worker_timeout")


def _stopped_error(what: str) -> WorkerError:
    return WorkerError(f"the training worker {what}; its result is lost. Retry once GET /train/status answers",
                       protocol.UNAVAILABLE, code="worker_stopped")


class WorkerConnection:
    """An asyncio client of one training worker; create and use it on one event loop.

    ``on_late_reply``: called (on the event loop) with the request id and the reply of a
    request whose caller had already timed out, e.g. a step that was applied after its
    504 (or a queued request the worker dropped at its deadline).
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.on_late_reply: Callable[[str, dict[str, Any]], None] | None = None
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)  # never queue a request for a worker not yet there
        monitor = self._socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._monitor = monitor
        self._events = zmq.Socket.shadow(monitor.underlying)  # read without awaiting
        self._socket.connect(address)
        self.connected = False
        self._disconnects = 0
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._receiver: asyncio.Task[None] | None = None

    def _read_events(self) -> None:
        """Apply the monitor's queued events to :attr:`connected`."""
        while True:
            try:
                event = parse_monitor_message(self._events.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self._disconnects += 1

    @property
    def disconnects(self) -> int:
        """How many times the worker went away so far (a restarted worker is a new one)."""
        self._read_events()
        return self._disconnects

    async def _wait_connected(self, op: str) -> None:
        self._read_events()
        waited = 0.0
        while not self.connected and waited < CONNECT_GRACE_S:
            await asyncio.sleep(0.05)
            waited += 0.05
            self._read_events()
        if not self.connected:
            raise WorkerError(f"the training worker is not running (starting, or being restarted after it "
                              f"stopped), so {op} cannot run now; inference is unaffected. Retry in a few "
                              "seconds", protocol.UNAVAILABLE, code="worker_unavailable")

    async def call(self, op: str, args: dict[str, Any] | None = None, *, timeout_s: float = 30.0,
                   request_id: str | None = None) -> dict[str, Any]:
        """Send one request and wait for its result; raises ``WorkerError``.

        The worker is told the deadline, so a request still queued when it passes is
        dropped there instead of running after its caller gave up. A request that was sent
        is always answered (its result, or that it was dropped), even after its caller
        timed out: that answer goes to ``on_late_reply``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        message = protocol.request(op, args, request_id=request_id, deadline=time.time() + timeout_s)
        await self._wait_connected(op)
        if self._receiver is None or self._receiver.done():
            self._receiver = loop.create_task(self._receive())
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending[message["id"]] = future
        disconnects = self._disconnects
        try:
            try:
                await asyncio.wait_for(self._socket.send(protocol.encode(message)), SEND_TIMEOUT_S)
            except asyncio.TimeoutError:  # the request never left: nothing will run it
                raise WorkerError(f"the training worker did not take {op} request {message['id']} within "
                                  f"{SEND_TIMEOUT_S:g} s, so it was not sent; retry in a few seconds",
                                  protocol.UNAVAILABLE, code="worker_busy") from None
            while not future.done():
                left = deadline - loop.time()
                if left <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait({future}, timeout=min(left, LIVENESS_POLL_S))
                self._read_events()
                if not future.done() and self._disconnects != disconnects:
                    raise _stopped_error(f"stopped while {op} request {message['id']} was queued or running")
            reply = future.result()
        except asyncio.TimeoutError:
            raise _timeout_error(op, message["id"], timeout_s) from None
        finally:
            self._pending.pop(message["id"], None)
        if not reply.get("ok"):
            raise WorkerError.from_dict(reply.get("error") or {})
        return reply["result"]

    async def _receive(self) -> None:
        while True:
            frame = await self._socket.recv()
            try:
                reply = protocol.decode(frame)
            except ValueError as exc:  # never the worker's; whatever sent it must not stop the replies
                log.warning("dropping an undecodable reply frame (%s)", exc)
                continue
            future = self._pending.get(reply.get("id"))
            if future is not None and not future.done():
                future.set_result(reply)
            elif future is None and self.on_late_reply is not None:
                self.on_late_reply(reply.get("id"), reply)
            else:
                log.info("dropping a late reply for request %s", reply.get("id"))

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
        self._socket.disable_monitor()
        self._events.close()
        self._monitor.close()
        self._socket.close()
        self._context.term()


def call_worker(address: str, op: str, args: dict[str, Any] | None = None, *,
                timeout_s: float = 30.0, context: zmq.Context | None = None,
                alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    """One blocking request on a fresh socket; returns the result or raises ``WorkerError``.

    ``alive``: whether the worker process still runs (e.g. ``popen.poll() is None``, which
    also reaps it), asked every ``LIVENESS_POLL_S`` while the reply is awaited, so a worker
    that exits without answering (it got its parent's signal and stopped by itself) fails
    the request at once with ``worker_stopped`` instead of at the timeout.
    """
    context = context or zmq.Context.instance()
    message = protocol.request(op, args, deadline=time.time() + timeout_s)
    with context.socket(zmq.DEALER) as socket:
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)
        socket.send(protocol.encode(message))
        deadline = time.monotonic() + timeout_s
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            if not socket.poll(min(left_ms, int(LIVENESS_POLL_S * 1000))):
                if alive is not None and not alive():
                    raise _stopped_error(f"exited before it answered {op} request {message['id']}")
                continue
            reply = protocol.decode(socket.recv())
            if reply.get("id") == message["id"]:
                if not reply.get("ok"):
                    raise WorkerError.from_dict(reply.get("error") or {})
                return reply["result"]
    raise _timeout_error(op, message["id"], timeout_s)
