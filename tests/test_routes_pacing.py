"""Inference first: training steps paced while generation requests are in flight."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from livetrain.routes import TrainingRoutes, router
from livetrain.routes.pacing import StepPacer
from livetrain.vllm_plugin.generation_count import GenerationCount


class FakeTime:
    """A clock that only moves when a step runs or the pacer sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def paced(duty: float) -> tuple[StepPacer, FakeTime]:
    fake = FakeTime()
    return StepPacer(duty, clock=fake.clock, sleep=fake.sleep), fake


async def step(pacer: StepPacer, fake: FakeTime, seconds: float) -> None:
    async with pacer.turn():
        fake.now += seconds


def test_while_generating_each_step_is_followed_by_its_pause_and_otherwise_none():
    pacer, fake = paced(0.25)

    async def scenario() -> None:
        await step(pacer, fake, 2.0)  # nothing generating: no pause before the next
        await step(pacer, fake, 2.0)
        assert fake.sleeps == []
        pacer.generation_started()
        await step(pacer, fake, 2.0)  # its predecessor ended just now: 2 s * 0.75 / 0.25
        await step(pacer, fake, 1.0)  # 2 s step before it: 6 s
        assert fake.sleeps == [6.0, 6.0]
        fake.now += 1.0  # time passes between requests: only the rest of the pause is left
        await step(pacer, fake, 1.0)
        assert fake.sleeps == [6.0, 6.0, 2.0]
        pacer.generation_finished()
        await step(pacer, fake, 1.0)  # generation over: back to back again
        assert fake.sleeps == [6.0, 6.0, 2.0] and pacer.paused_s == 14.0

    asyncio.run(scenario())


def test_duty_one_never_pauses_and_a_duty_outside_0_1_is_refused():
    pacer, fake = paced(1.0)
    pacer.generation_started()

    async def scenario() -> None:
        for _ in range(3):
            await step(pacer, fake, 1.0)

    asyncio.run(scenario())
    assert fake.sleeps == []
    for duty in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError, match="duty"):
            StepPacer(duty)


def test_steps_take_turns():
    pacer = StepPacer(1.0)
    order: list[str] = []

    async def one(name: str) -> None:
        async with pacer.turn():
            order.append(f"{name} start")
            await asyncio.sleep(0.01)
            order.append(f"{name} end")

    async def scenario() -> None:
        await asyncio.gather(one("a"), one("b"))

    asyncio.run(scenario())
    assert order == ["a start", "a end", "b start", "b end"]


def test_generation_requests_are_counted_while_they_run_and_nothing_else():
    pacer = StepPacer(0.5)
    seen: list[int] = []

    async def app(scope, receive, send):
        seen.append(pacer.generations)
        if scope["path"] == "/v1/fails":
            raise RuntimeError("the app failed")

    counted = GenerationCount(app, pacer=lambda scope: pacer)

    async def call(method: str, path: str) -> None:
        await counted({"type": "http", "method": method, "path": path}, None, None)

    asyncio.run(call("POST", "/v1/chat/completions"))
    asyncio.run(call("POST", "/v1/completions"))
    asyncio.run(call("GET", "/v1/models"))
    asyncio.run(call("POST", "/train"))
    assert seen == [1, 1, 0, 0] and pacer.generations == 0
    failing = GenerationCount(app, pacer=lambda scope: pacer)
    with pytest.raises(RuntimeError):
        asyncio.run(failing({"type": "http", "method": "POST", "path": "/v1/fails"}, None, None))
    assert pacer.generations == 0
    # Before the training routes exist nothing is counted.
    asyncio.run(GenerationCount(app, pacer=lambda scope: None)(
        {"type": "http", "method": "POST", "path": "/v1/completions"}, None, None))
    assert seen[-1] == 0


class StepWorker:
    """The training worker's side of the routes: each step takes one second of fake time."""

    on_late_reply = None

    def __init__(self, fake: FakeTime) -> None:
        self.fake, self.ops = fake, []
        self.version = 0

    async def call(self, op, args=None, *, timeout_s=30.0, request_id=None):
        self.ops.append((op, self.fake.now))
        if op == "status":
            return {"weights_version": self.version}
        self.fake.now += 1.0
        self.version += 1
        return {"applied": True, "seconds": 1.0, "weights_version": self.version, "changed_tensors": []}


def routes_app(duty: float) -> tuple[FastAPI, StepPacer, FakeTime, StepWorker]:
    """The training routes on an app, with a paced fake-time worker."""
    pacer, fake = paced(duty)
    worker = StepWorker(fake)
    app = FastAPI()
    app.include_router(router)
    TrainingRoutes(worker, pacer=pacer).install(app.state)
    return app, pacer, fake, worker


def test_train_requests_are_paced_and_status_reports_it():
    app, pacer, fake, worker = routes_app(0.5)
    example = {"examples": [{"context_ids": [1, 2, 3], "continuation_ids": [4, 5]}]}
    with TestClient(app, base_url="http://127.0.0.1:8000") as http:
        pacer.generation_started()
        for _ in range(2):
            assert http.post("/train", json=example).status_code == 200
        assert http.post("/train/logprobs", json=example["examples"][0]).status_code == 200
        status = http.get("/train/status").json()
    # The second step waited out the first one's pause (1 s step, duty 0.5); log-probs did not wait.
    assert [op for op, _ in worker.ops] == ["train", "train", "logprobs", "status"]
    assert worker.ops[1][1] == 2.0 and worker.ops[2][1] == 3.0 and fake.sleeps == [1.0]
    assert status["pacing"] == {"trainer_duty": 0.5, "generations_in_flight": 1, "paused_s": 1.0}


def test_a_step_whose_turn_would_come_after_its_timeout_gets_504_and_never_runs():
    app, pacer, fake, worker = routes_app(0.25)
    example = {"context_ids": [1, 2, 3], "continuation_ids": [4, 5]}
    with TestClient(app, base_url="http://127.0.0.1:8000") as http:
        pacer.generation_started()
        assert http.post("/train", json={"examples": [example]}).status_code == 200
        # The 1 s step is followed by a 3 s pause while generating: a 2 s timeout cannot be met.
        response = http.post("/train", json={"examples": [example], "timeout_s": 2})
        assert response.status_code == 504 and response.json()["error"]["code"] == "paced_timeout"
        pacer.generation_finished()  # nothing generating: no pause, the next step runs at once
        assert http.post("/train", json={"examples": [example], "timeout_s": 2}).status_code == 200
    assert [op for op, _ in worker.ops] == ["train", "train"] and fake.sleeps == []
