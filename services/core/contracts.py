"""The wire between the API/SCP and the workers: task names, queues, payloads (IDs only).

Producers send tasks by name (services/runtime/queue.py) and never import task code; the worker
(services/worker) registers these names.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Protocol

from pydantic import BaseModel, Field

TASK_CLASSIFY: Final = "crgate.classify_study"
TASK_HOUSEKEEPING: Final = "crgate.housekeeping"  # the periodic pass (arrivals, stale jobs)
TASK_CR_SWEEP: Final = "crgate.cr_sweep"
TASK_FORWARD: Final = "crgate.forward"
QUEUE_CLASSIFY: Final = "crgate.classify"
QUEUE_SWEEP: Final = "crgate.sweep"  # CR safety studies: long, apart from classifications
QUEUE_FORWARD: Final = "crgate.forward"  # C-STORE to destinations: never in a job's way


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class JobKind(StrEnum):
    CLASSIFY = "classify"  # transcode the mammograms, classify them at the CR and as received
    COMPRESS = "compress"  # transcode every image of the study (any modality) at the CR


class JobTrigger(StrEnum):
    API = "api"  # POST /studies/{uid}/classify
    ARRIVAL = "arrival"  # a policy's action when a study became ready
    CLI = "cli"


class ClassifyPayload(BaseModel):
    """The only thing a classify task carries: which job to run."""

    job_id: str = Field(min_length=1, max_length=36)


class SweepPayload(BaseModel):
    """A CR safety study to run (`POST /studies:cr-sweep`)."""

    sweep_id: str = Field(min_length=1, max_length=36)


class ForwardPayload(BaseModel):
    """Objects to send to one destination (rows of the ``forwards`` table)."""

    forward_ids: list[str] = Field(min_length=1, max_length=1000)


Payload = ClassifyPayload | SweepPayload | ForwardPayload


class JobQueue(Protocol):
    """Hands a job to whatever runs jobs (Celery workers, or a thread in `crgate serve`)."""

    def enqueue(self, payload: Payload) -> None: ...
