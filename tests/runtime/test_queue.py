"""The producer side of the queue on the real Redis: each job kind on its own queue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from services.core.config import Settings
from services.core.contracts import (
    QUEUE_CLASSIFY,
    QUEUE_SWEEP,
    TASK_CLASSIFY,
    TASK_CR_SWEEP,
    ClassifyPayload,
    SweepPayload,
)
from services.runtime.queue import CeleryJobQueue

REDIS_DB = 13


@pytest.fixture
def broker() -> redis.Redis:  # type: ignore[type-arg]
    client = redis.Redis.from_url(f"redis://127.0.0.1:6379/{REDIS_DB}")
    client.flushdb()
    return client


def task_names(client: redis.Redis, queue: str) -> list[str]:  # type: ignore[type-arg]
    return [json.loads(m)["headers"]["task"] for m in client.lrange(queue, 0, -1)]


def test_sweeps_and_classifications_go_to_their_own_queues(
    broker: redis.Redis,  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    """A sweep (hours) on the classify queue would starve classifications at concurrency 1."""
    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    queue = CeleryJobQueue(Settings(data_dir=tmp_path, broker_url=url))
    try:
        queue.enqueue(ClassifyPayload(job_id="job-1"))
        queue.enqueue(SweepPayload(sweep_id="sweep-1"))
    finally:
        queue.close()
    assert task_names(broker, QUEUE_CLASSIFY) == [TASK_CLASSIFY]
    assert task_names(broker, QUEUE_SWEEP) == [TASK_CR_SWEEP]


def test_a_broker_that_refuses_is_a_connection_error(tmp_path: Path) -> None:
    """The caller (classify.request) then leaves the job for the housekeeping pass."""
    from tests.conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    queue = CeleryJobQueue(Settings(data_dir=tmp_path, broker_url=url))
    queue.app.conf.broker_connection_max_retries = 0
    try:
        with pytest.raises(ConnectionError, match="broker did not take the task"):
            queue.enqueue(ClassifyPayload(job_id="job-1"))
    finally:
        queue.close()
