"""The compress use case: every image of a stored study, of any modality, transcoded at a CR.

``request`` makes the jobs (a route, the arrival tracker or a test asks): with a CR, one job for
every image of the study; without one, one job per policy that the study's series fall under
(a PET/CT study under two policies gets two). ``execute`` is the job's body, run by
services/core/runner.py for jobs of kind ``compress``: per image decode -> encode at the CR ->
measure -> a derived copy (one derived series per source series, kept in the study, or only
written for the destinations when the policy says ``keep_copy=false``). An image the transcoder
cannot code (palette colour, 1 bit, float pixels, an undecodable syntax) is skipped with its
reason; the rest of the study goes on. Multi-frame images are coded frame by frame, one result
row per image with its frame count. Originals are never changed or deleted.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.core import jobs
from services.core.classify import (
    JobContext,
    check_override,
    job_instances,
    record_override,
    reference,
    study_pediatric,
)
from services.core.codecs import OutputSyntax
from services.core.contracts import ClassifyPayload, JobKind, JobQueue, JobTrigger
from services.core.db.tables import Instance, Job, Policy, Result, Series, Study
from services.core.dicom.io import read_dataset, write_dataset
from services.core.errors import CrgateError, InvalidInput, NotFound
from services.core.forwards import ForwardObject, forward_result
from services.core.ingest import Channel
from services.core.pipeline import TranscodeResult, transcode_dataset
from services.core.policies import (
    DEFAULT_FORWARD_WHAT,
    Ceiling,
    PolicyKey,
    ResolvedPolicy,
    ceiling,
    resolve_policy,
)
from services.core.ratio import CompressionRatio

log = logging.getLogger(__name__)

MAX_PARALLEL_IMAGES = 4
_T = TypeVar("_T")


@dataclass(frozen=True)
class PolicyGroup:
    """The images of a study that fall under one policy."""

    policy: ResolvedPolicy
    instances: list[Instance]


def compressible_instances(session: Session, study_uid: str) -> list[Instance]:
    """The study's images as received (rows with a Rows value; crgate's own outputs and
    non-image objects such as SR left out)."""
    query = (
        select(Instance)
        .where(
            Instance.study_uid == study_uid,
            Instance.channel != Channel.WORKER.value,
            Instance.rows.is_not(None),
        )
        .order_by(Instance.series_uid, Instance.instance_number, Instance.sop_instance_uid)
    )
    return list(session.scalars(query))


def policy_groups(
    session: Session, ctx: JobContext, instances: list[Instance]
) -> list[PolicyGroup]:
    """Group ``instances`` by the policy of their series (modality, body part) and patient."""
    if not instances:
        return []
    series = {
        s.series_uid: s
        for s in session.scalars(
            select(Series).where(Series.series_uid.in_({i.series_uid for i in instances}))
        )
    }
    pediatric = study_pediatric(ctx.store, instances[0])
    groups: dict[int, PolicyGroup] = {}
    for instance in instances:
        row = series.get(instance.series_uid)
        policy = resolve_policy(
            session,
            modality=row.modality if row is not None else None,
            body_part=row.body_part_examined if row is not None else None,
            pediatric=pediatric,
        )
        groups.setdefault(policy.policy_id, PolicyGroup(policy, [])).instances.append(instance)
    return list(groups.values())


def request(
    ctx: JobContext,
    queue: JobQueue,
    study_uid: str,
    *,
    cr: CompressionRatio | None,
    syntax: str | None,
    trigger: JobTrigger,
    requested_by: str | None,
    keep_copy: bool | None = None,
    may_exceed_ceiling: bool = False,
    reason: str | None = None,
    policy_ids: set[int] | None = None,
) -> list[tuple[Job, bool]]:
    """Ask for the study's compression: the jobs made (or found: the same request twice gives
    the same jobs), each with whether it is new. ``policy_ids`` limits a policy-driven request
    to the groups of those policies (the arrival tracker asks only for policies that compress).

    A CR above the ceiling of a policy the study falls under needs ``may_exceed_ceiling`` (the
    admin role) and a ``reason``; the override is audit-logged.
    """
    planned = prepare(
        ctx,
        study_uid,
        cr=cr,
        syntax=syntax,
        trigger=trigger,
        requested_by=requested_by,
        keep_copy=keep_copy,
        may_exceed_ceiling=may_exceed_ceiling,
        reason=reason,
        policy_ids=policy_ids,
    )
    made = []
    for job_request, exceeded in planned:
        job, created = jobs.submit(ctx.sessions, job_request)
        if exceeded is not None:
            record_override(ctx, job, job_request, exceeded, reason)
        if created:
            jobs.hand_over(queue, ClassifyPayload(job_id=job.id), f"job {job.id}")
        made.append((job, created))
    return made


def prepare(
    ctx: JobContext,
    study_uid: str,
    *,
    cr: CompressionRatio | None,
    syntax: str | None,
    trigger: JobTrigger,
    requested_by: str | None,
    keep_copy: bool | None,
    may_exceed_ceiling: bool,
    reason: str | None,
    policy_ids: set[int] | None,
) -> list[tuple[jobs.JobRequest, Ceiling | None]]:
    """The job requests for a compression of the study, and the ceiling each exceeds."""
    if syntax is not None:
        OutputSyntax.parse(syntax)  # a bad name is refused before anything else
    with ctx.sessions() as session:
        if session.get(Study, study_uid) is None:
            raise NotFound(f"no study {study_uid} in the store")
        instances = compressible_instances(session, study_uid)
        if not instances:
            raise InvalidInput(
                f"study {study_uid} has no image to compress (only objects without pixel "
                "data, or crgate's own outputs)"
            )
        groups = policy_groups(session, ctx, instances)
        if policy_ids is not None:
            groups = [g for g in groups if g.policy.policy_id in policy_ids]
        if cr is None:
            return [
                (_policy_request(study_uid, g, syntax, trigger, requested_by, keep_copy), None)
                for g in groups
            ]
        exceeded = _lowest_exceeded(session, groups, cr)
    if exceeded is not None:
        check_override(cr, exceeded, may_exceed_ceiling, reason)
    out_syntax = OutputSyntax.for_cr(cr, syntax)
    job_request = jobs.JobRequest(
        study_uid=study_uid,
        cr=float(cr),
        syntax=out_syntax.value,
        model="",
        model_sha256="",
        instance_uids=tuple(i.sop_instance_uid for g in groups for i in g.instances),
        policy_id=None,
        policy_source="requested",
        trigger=trigger,
        requested_cr=float(cr),
        requested_by=requested_by,
        kind=JobKind.COMPRESS,
        options={"keep_copy": True if keep_copy is None else keep_copy},
    )
    return [(job_request, exceeded)]


def _policy_request(
    study_uid: str,
    group: PolicyGroup,
    syntax: str | None,
    trigger: JobTrigger,
    requested_by: str | None,
    keep_copy: bool | None,
) -> jobs.JobRequest:
    policy = group.policy
    options: dict[str, Any] = {"keep_copy": policy.keep_copy if keep_copy is None else keep_copy}
    if trigger is JobTrigger.ARRIVAL:  # the policy's forward action goes with its compression
        options.update(policy.forward_options())
    return jobs.JobRequest(
        study_uid=study_uid,
        cr=policy.cr,
        syntax=OutputSyntax.for_cr(policy.cr, syntax or policy.syntax).value,
        model="",
        model_sha256="",
        instance_uids=tuple(i.sop_instance_uid for i in group.instances),
        policy_id=policy.policy_id,
        policy_source=policy.source,
        trigger=trigger,
        requested_by=requested_by,
        kind=JobKind.COMPRESS,
        options=options,
    )


def _lowest_exceeded(session: Session, groups: list[PolicyGroup], cr: float) -> Ceiling | None:
    """The lowest ceiling among the groups' policies that ``cr`` is above."""
    found: Ceiling | None = None
    for group in groups:
        p = group.policy
        limit = ceiling(
            session, PolicyKey(p.modality, p.body_part, p.pediatric), session.get(Policy, p.id)
        )
        if (
            limit is not None
            and cr > limit.max_cr
            and (found is None or limit.max_cr < found.max_cr)
        ):
            found = limit
    return found


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class _Outcome:
    """What coding one image gave: its row and stored copy, or why it was skipped."""

    image: dict[str, Any] | None = None
    kept: tuple[dict[str, str] | None, Path] | None = None
    skipped: dict[str, Any] | None = None


@dataclass
class _Done:
    """What the job did with its images so far."""

    images: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    outputs: list[dict[str, str]]
    files: list[Path]


def execute(ctx: JobContext, job_id: str, progress: Callable[[int, int], None]) -> Result:
    """The body of a compress job: every image it was made for, a few at a time in threads
    (bounded memory), then the result row (images in the job's order)."""
    started = time.perf_counter()
    with ctx.sessions() as session:
        job = jobs.get_job(session, job_id)
        instances = job_instances(session, job)
        series = {
            s.series_uid: s
            for s in session.scalars(
                select(Series).where(Series.series_uid.in_({i.series_uid for i in instances}))
            )
        }
        cr, syntax, options = CompressionRatio(job.cr), job.syntax, dict(job.options or {})
        study_uid, policy_source, requested_cr = job.study_uid, job.policy_source, job.requested_cr
    if not instances:
        raise InvalidInput(f"study {study_uid} has no image to compress any more")
    result_id = str(uuid.uuid4())
    keep_copy = bool(options.get("keep_copy", True))
    done = _Done([], [], [], [])
    order = {uid: n for n, uid in enumerate(dict.fromkeys(i.series_uid for i in instances), 1)}
    workers = parallel_images(ctx.settings.threads, len(instances))
    threads = ctx.settings.threads if workers == 1 else (ctx.settings.threads or 1)

    def code(instance: Instance) -> _Outcome:
        """One image: read, decode, encode, measure, then its derived copy stored (numpy,
        OpenJPEG, OpenJPH and the fsyncs release the GIL: images run in parallel threads)."""
        source = series.get(instance.series_uid)
        where: dict[str, Any] = {
            "input_sop_instance_uid": instance.sop_instance_uid,
            "series_uid": instance.series_uid,
            "modality": source.modality if source is not None else None,
        }
        try:
            ds = read_dataset(ctx.store.absolute(instance.path))
            frames = int(ds.get("NumberOfFrames") or 1)
            coded = transcode_dataset(
                ds, cr=cr, syntax=syntax, threads=threads, source=instance.sop_instance_uid
            )
        except CrgateError as exc:  # this image cannot be coded; the others go on
            log.info("job %s: image %s skipped: %s", job_id, instance.sop_instance_uid, exc)
            return _Outcome(skipped={**where, "reason": str(exc)})
        coded = replace(coded, decoded=None)  # the measured pixels are not kept
        kept = _keep(ctx, coded, where, (job_id, result_id, keep_copy), placement(instance))
        return _Outcome(image=_image_row(coded, where, frames), kept=kept)

    def placement(instance: Instance) -> tuple[int, int]:
        """(series number, instance number) of an image's copy in its derived series."""
        return 9000 + order[instance.series_uid], instance.instance_number or 1

    with ThreadPoolExecutor(workers, thread_name_prefix="compress") as pool:
        for count, outcome in enumerate(
            _in_order(pool, code, instances, window=2 * workers), start=1
        ):
            if outcome.skipped is not None:
                done.skipped.append(outcome.skipped)
            if outcome.image is not None:
                done.images.append(outcome.image)
            if outcome.kept is not None:
                reference_, file = outcome.kept
                if reference_ is not None:
                    done.outputs.append(reference_)
                done.files.append(file)
            progress(count, len(instances))
    compressed_at = time.perf_counter()
    forwarded = _forward(ctx, options, instances, done.files, (job_id, study_uid))
    finished = time.perf_counter()
    payload = {
        "kind": JobKind.COMPRESS.value,
        "result_id": result_id,
        "job_id": job_id,
        "study_uid": study_uid,
        "requested_cr": requested_cr,
        "applied_cr": float(cr),
        "syntax": syntax,
        "policy": policy_source,
        "summary": _summary(done),
        "images": done.images,
        "skipped": done.skipped,
        "outputs": {"stored_in_study": keep_copy, "derived": done.outputs, **forwarded},
        "timings_ms": {
            "compress": round((compressed_at - started) * 1000, 1),
            "total": round((finished - started) * 1000, 1),
        },
    }
    return Result(id=result_id, job_id=job_id, study_uid=study_uid, payload=payload)


def parallel_images(threads: int, images: int) -> int:
    """How many images a job codes at once: one per core (at most MAX_PARALLEL_IMAGES), or one
    when the site fixed the threads per encode (CRGATE_THREADS)."""
    if threads or images < 2:
        return 1
    return max(1, min(MAX_PARALLEL_IMAGES, len(os.sched_getaffinity(0)), images))


def _in_order(
    pool: ThreadPoolExecutor,
    fn: Callable[[Instance], _T],
    items: Iterable[Instance],
    *,
    window: int,
) -> Iterator[_T]:
    """``pool.map`` with at most ``window`` results in flight (bounded memory), in order."""
    pending: deque[Future[_T]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _keep(
    ctx: JobContext,
    transcoded: TranscodeResult,
    where: dict[str, Any],
    job: tuple[str, str, bool],
    placement: tuple[int, int],
) -> tuple[dict[str, str] | None, Path]:
    """Store the derived copy in the study (keep_copy), or write it among the result's files
    for the destinations only. Returns its reference when stored, and its file."""
    from services.core.dicom import results as objects

    job_id, result_id, keep_copy = job
    (copy,) = objects.derived_copies(
        [transcoded],
        job_id=job_id,
        cr=transcoded.target_cr,
        series_number=placement[0],
        series_role=f"derived:{where['series_uid']}",
    )
    copy.InstanceNumber = placement[1]  # the original's place in its series
    where["output_sop_instance_uid"] = str(copy.SOPInstanceUID)
    if not keep_copy:
        path = ctx.results_dir(result_id) / "copies" / f"{copy.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_dataset(copy, path, private=True)
        return None, path
    stored = ctx.outputs_ingestor.ingest_dataset(
        copy, channel=Channel.WORKER, source=f"job:{job_id}"
    )
    path = ctx.store.absolute(
        ctx.store.relative_path(stored.study_uid, stored.series_uid, stored.sop_instance_uid)
    )
    return reference(stored.series_uid, stored.sop_instance_uid, stored.sop_class_uid), path


def _image_row(transcoded: TranscodeResult, where: dict[str, Any], frames: int) -> dict[str, Any]:
    row = {**where, **transcoded.as_dict()}
    row["output_sop_instance_uid"] = where["output_sop_instance_uid"]
    row["frames"] = frames
    for key in ("source", "output"):
        row.pop(key, None)
    for key in ("decode_ms", "encode_ms", "metrics_ms", "total_ms"):
        row[key] = round(row[key], 1)
    return row


def _summary(done: _Done) -> dict[str, Any]:
    bytes_in = sum(i["bytes_in"] for i in done.images)
    bytes_out = sum(i["bytes_out"] for i in done.images)
    return {
        "images": len(done.images),
        "frames": sum(i["frames"] for i in done.images),
        "skipped": len(done.skipped),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "achieved_cr": round(bytes_in / bytes_out, 3) if bytes_out else None,
        "min_psnr_db": min((i["psnr_db"] for i in done.images), default=None),
        "max_abs_error": max((i["max_abs_error"] for i in done.images), default=None),
    }


def _forward(
    ctx: JobContext,
    options: dict[str, Any],
    instances: list[Instance],
    copies: list[Path],
    job: tuple[str, str],
) -> dict[str, Any]:
    """The job's forward action (a policy's, else CRGATE_FORWARD_TO's): rows recorded and
    handed to the forward queue; never fails the result."""
    job_id, study_uid = job
    what = set(options.get("forward_what") or DEFAULT_FORWARD_WHAT)
    objects: list[ForwardObject] = []
    if "compressed" in what:  # a copy's file is named by its SOP Instance UID
        objects += [
            ForwardObject(study_uid, p.stem, "compressed", job_id, _kept_out(ctx, p))
            for p in copies
        ]
    if "originals" in what:
        objects += [
            ForwardObject(study_uid, i.sop_instance_uid, "original", job_id) for i in instances
        ]
    forwarded = forward_result(ctx, job_id, study_uid, objects, options.get("forward_to"))
    return {} if forwarded is None else {"forwarded": forwarded}


def _kept_out(ctx: JobContext, path: Path) -> str | None:
    """A copy written among the result's files (not in the index): its store-relative path."""
    try:
        relative = path.resolve().relative_to(ctx.store.root.resolve())
    except ValueError:
        return None
    return None if relative.parts[0] == "instances" else str(relative)
