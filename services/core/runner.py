"""Running one job, of either kind, through its lifecycle: claim, heartbeat with progress,
the kind's body (``classify.execute`` or ``compress.execute``), succeed or fail with a reason.

The same code whether a Celery worker (services/worker/tasks.py) or the in-process runner of
`crgate serve` (services/runtime/queue.py) runs it.
"""

from __future__ import annotations

import logging

from services.core import classify, compress, deletion, jobs
from services.core.classify import JobContext
from services.core.contracts import JobKind
from services.core.errors import CrgateError

log = logging.getLogger(__name__)

BODIES = {JobKind.CLASSIFY: classify.execute, JobKind.COMPRESS: compress.execute}


def run_job(ctx: JobContext, job_id: str) -> str | None:
    """Run job ``job_id`` to the end; return its result id (None when it failed).

    Permanent problems (a CrgateError: bad study, undecodable image) fail the job with the
    reason. Anything else propagates so that the caller (Celery) retries (it gives a job
    stopped by a transient error back to the queue first); a stale-job sweep puts a job back if
    its worker died, and the claim fails it after ``jobs.MAX_ATTEMPTS`` such deaths.
    """
    job = jobs.claim(ctx.sessions, job_id, stale_after_s=ctx.settings.job_stale_seconds)
    if job is None:
        with ctx.sessions() as session:
            return jobs.get_job(session, job_id).result_id
    log.info(
        "job %s: %s study %s at CR %g (attempt %d)",
        job.id,
        job.kind,
        job.study_uid,
        job.cr,
        job.attempts,
    )
    body = BODIES[JobKind(job.kind)]
    try:
        with jobs.JOBS.beating(ctx.sessions, job_id) as progress:
            result = body(ctx, job_id, progress)
    except CrgateError as exc:
        jobs.fail(ctx.sessions, job_id, reason=str(exc))
        log.warning("job %s failed: %s", job_id, exc)
        return None
    if deletion.deleted_meanwhile(ctx.sessions, job_id):  # its study went while it ran
        deletion.discard_outputs(ctx.sessions, ctx.store, job_id, result.id)
        log.warning("job %s: its study was deleted while it ran; outputs discarded", job_id)
        return None
    jobs.succeed(ctx.sessions, job_id, result=result)
    log.info("job %s succeeded: result %s", job_id, result.id)
    return result.id
