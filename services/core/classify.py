"""The one classify use case: from a study UID to a stored result.

``prepare`` turns a request (API, arrival tracker, CLI) into a job request: it checks the study
and resolves the CR (explicit, or the site's policy). ``execute`` is the job's body, run by
services/core/runner.py whether a Celery worker or the in-process runner of `crgate serve` runs it:

claim the job -> read the mammograms it was made for -> transcode at the CR + classify (on the
compressed copy and on the original) -> overlay PNGs -> DICOM outputs through the ingest path
(derived series, Secondary Capture overlays, Comprehensive SR) -> result row -> job succeeded.
A retried job stores the same output objects again (UIDs stable per job), replacing its own.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.core import audit, jobs
from services.core.codecs import OutputSyntax
from services.core.config import DuplicatePolicy, Settings
from services.core.contracts import ClassifyPayload, JobKind, JobQueue, JobStatus, JobTrigger
from services.core.db.tables import Instance, Job, Policy, Result, Series, Study
from services.core.dicom.io import read_dataset
from services.core.errors import (
    Forbidden,
    InvalidInput,
    InvalidParameter,
    NotFound,
)
from services.core.forwards import Forwarding, ForwardObject, forward_result
from services.core.inference.card import ModelCard, load_card
from services.core.inference.registry import find_card, installed
from services.core.inference.runtime import Classifier, get_classifier
from services.core.ingest import Channel, Ingestor
from services.core.pipeline import Classification, TranscodeResult, classify_datasets
from services.core.policies import (
    CLASSIFIABLE_MODALITY,
    DEFAULT_FORWARD_WHAT,
    Ceiling,
    OverrideRequired,
    PolicyKey,
    ceiling,
    resolve_policy,
)
from services.core.ratio import CompressionRatio
from services.core.storage import InstanceStore

log = logging.getLogger(__name__)

OVERLAY_MAX_SIDE = 1024
PEDIATRIC_BELOW_YEARS = 18  # pediatric policies apply to patients younger than this
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


@dataclass
class JobContext:
    """What a job needs; built once per worker process (one ONNX session per model)."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: InstanceStore
    ingestor: Ingestor
    forward: Forwarding | None = None  # the sender, the forward queue, CRGATE_FORWARD_TO

    def card_path(self, model: str) -> Path:
        try:
            return find_card(self.settings.models_dir, model)
        except NotFound:  # a request naming a model that is not there: a bad parameter
            known = installed(self.settings.models_dir)
            raise InvalidParameter(
                f"unknown model {model!r}; installed models: {', '.join(known) or 'none'}"
            ) from None

    def card(self, model: str) -> ModelCard:
        return load_card(self.card_path(model))

    def classifier(self, model: str) -> Classifier:
        return get_classifier(self.card_path(model))

    def results_dir(self, result_id: str) -> Path:
        return self.store.root / "results" / result_id

    @cached_property
    def outputs_ingestor(self) -> Ingestor:
        """The ingest path for a job's own outputs: an object with the same UID replaces the
        stored one (only the same job makes those UIDs: it is a retry storing its objects again),
        whatever the site's duplicate policy for incoming instances."""
        ingestor = Ingestor(self.store, self.sessions, DuplicatePolicy.REPLACE)
        ingestor.observers = self.ingestor.observers
        return ingestor


def classifiable_instances(session: Session, study_uid: str) -> list[Instance]:
    """The study's mammograms as received (crgate's own derived objects excluded)."""
    query = (
        select(Instance)
        .join(Series, Series.series_uid == Instance.series_uid)
        .where(
            Instance.study_uid == study_uid,
            Series.modality == CLASSIFIABLE_MODALITY,
            Instance.channel != Channel.WORKER.value,
        )
        .order_by(Instance.series_uid, Instance.instance_number, Instance.sop_instance_uid)
    )
    return list(session.scalars(query))


def job_instances(session: Session, job: Job) -> list[Instance]:
    """Exactly the instances job ``job`` was made for (the study's, for a job made before
    the instance set was stored with it); InvalidInput if some are gone from the store."""
    wanted = job.instance_uids
    if wanted is None:
        return classifiable_instances(session, job.study_uid)
    found = list(
        session.scalars(
            select(Instance)
            .where(Instance.sop_instance_uid.in_(wanted))
            .order_by(Instance.series_uid, Instance.instance_number, Instance.sop_instance_uid)
        )
    )
    missing = sorted(set(wanted) - {i.sop_instance_uid for i in found})
    if missing:
        raise InvalidInput(
            f"{len(missing)} of the {len(wanted)} images this job was made for are no longer "
            f"in the store (first: {missing[0]}); ask again to classify the study as it is now"
        )
    return found


def request(
    ctx: JobContext,
    queue: JobQueue,
    study_uid: str,
    *,
    cr: CompressionRatio | None,
    syntax: str | None,
    model: str | None,
    trigger: JobTrigger,
    requested_by: str | None,
    may_exceed_ceiling: bool = False,
    reason: str | None = None,
    store: bool = True,
) -> tuple[Job, bool]:
    """Ask for a classification: the one way a route, the arrival tracker or a test makes a job.

    Checks the study and resolves the CR (:func:`prepare`), records the job (the same request
    twice gives the same job) and hands a new one to the queue. A queue that cannot take it
    (broker down) leaves the job recorded as queued: the housekeeping pass sends it again.
    A requested CR above the ceiling of the study's policy needs ``may_exceed_ceiling`` (the
    admin role) and a ``reason``; the override is audit-logged. ``store=False`` keeps every
    output out of the patient's study (a research copy: the result and its overlay PNGs only).
    Returns the job and whether it is new.
    """
    job_request, exceeded = prepare(
        ctx,
        study_uid,
        cr=cr,
        syntax=syntax,
        model=model,
        trigger=trigger,
        requested_by=requested_by,
        may_exceed_ceiling=may_exceed_ceiling,
        reason=reason,
        store=store,
    )
    job, created = jobs.submit(ctx.sessions, job_request)
    if exceeded is not None:
        record_override(ctx, job, job_request, exceeded, reason)
    if created:
        jobs.hand_over(queue, ClassifyPayload(job_id=job.id), f"job {job.id}")
    return job, created


def record_override(
    ctx: JobContext, job: Job, request: jobs.JobRequest, limit: Ceiling, reason: str | None
) -> None:
    """The audit entry of a job granted a CR above its ceiling (entity job, action override)."""
    with ctx.sessions.begin() as session:
        audit.record(
            session,
            actor=request.requested_by or "unknown",
            action="override",
            entity="job",
            entity_id=job.id,
            before=None,
            after={
                "kind": request.kind.value,
                "study_uid": request.study_uid,
                "cr": request.cr,
                "max_cr": limit.max_cr,
                "preset": limit.preset,
                "policy": request.policy_source,
            },
            reason=reason,
        )


def prepare(
    ctx: JobContext,
    study_uid: str,
    *,
    cr: CompressionRatio | None,
    syntax: str | None,
    model: str | None,
    trigger: JobTrigger,
    requested_by: str | None,
    may_exceed_ceiling: bool = False,
    reason: str | None = None,
    store: bool = True,
) -> tuple[jobs.JobRequest, Ceiling | None]:
    """Check the study and the parameters; resolve the CR from the policy when none is given.

    A requested CR is checked against the ceiling of the study's policy: above it, Forbidden
    unless ``may_exceed_ceiling``, OverrideRequired without a ``reason``. Returns the request
    and the ceiling it exceeds (None within it)."""
    model = model or ctx.settings.default_model
    card = ctx.card(model)
    with ctx.sessions() as session:
        study = session.get(Study, study_uid)
        if study is None:
            raise NotFound(f"no study {study_uid} in the store")
        instances = classifiable_instances(session, study_uid)
        if not instances:
            raise InvalidInput(
                f"study {study_uid} has no image the model {model} can read "
                f"(it reads {CLASSIFIABLE_MODALITY} images)"
            )
        policy_id: int | None = None
        exceeded: Ceiling | None = None
        options: dict[str, Any] = {} if store else {"store": False}
        if cr is None:
            resolved = resolve_study_policy(session, study_uid, ctx.store)
            applied_cr, policy_id, source = float(resolved.cr), resolved.policy_id, resolved.source
            syntax = syntax or str(resolved.syntax)
            if trigger is JobTrigger.ARRIVAL:  # the policy's forward action goes with it
                options.update(resolved.forward_options())
        else:
            applied_cr, source = cr, "requested"
            exceeded = _exceeded_ceiling(session, study_uid, ctx.store, cr)
            if exceeded is not None:
                check_override(cr, exceeded, may_exceed_ceiling, reason)
    out_syntax = OutputSyntax.for_cr(applied_cr, syntax)
    return jobs.JobRequest(
        study_uid=study_uid,
        cr=applied_cr,
        syntax=out_syntax.value,
        model=model,
        model_sha256=card.sha256,
        instance_uids=tuple(i.sop_instance_uid for i in instances),
        policy_id=policy_id,
        policy_source=source,
        trigger=trigger,
        requested_cr=cr,
        requested_by=requested_by,
        options=options or None,
    ), exceeded


def _exceeded_ceiling(
    session: Session, study_uid: str, store: InstanceStore, cr: float
) -> Ceiling | None:
    """The ceiling of the study's policy when ``cr`` is above it."""
    resolved = resolve_study_policy(session, study_uid, store)
    row = session.get(Policy, resolved.policy_id)
    key = PolicyKey(resolved.modality, resolved.body_part, resolved.pediatric)
    limit = ceiling(session, key, row)
    return limit if limit is not None and cr > limit.max_cr else None


def check_override(cr: float, limit: Ceiling, allowed: bool, reason: str | None) -> None:
    if not allowed:
        raise Forbidden(
            f"CR {cr:g} is above the maximum {limit.max_cr:g} set by preset {limit.preset} for "
            "this study's policy: only an admin can ask for it, with a reason",
            cr=cr,
            max_cr=limit.max_cr,
            preset=limit.preset,
        )
    if not (reason and reason.strip()):
        raise OverrideRequired(
            f"CR {cr:g} is above the maximum {limit.max_cr:g} set by preset {limit.preset} for "
            "this study's policy: give a reason (reason=...) to go above it; it is audit-logged",
            cr=cr,
            max_cr=limit.max_cr,
            preset=limit.preset,
        )


def resolve_study_policy(session: Session, study_uid: str, store: InstanceStore) -> Any:
    """The policy for the study's mammograms: by body part and whether the patient is
    pediatric (from the header of its first mammogram)."""
    series = session.scalars(
        select(Series).where(
            Series.study_uid == study_uid, Series.modality == CLASSIFIABLE_MODALITY
        )
    ).first()
    body_part = series.body_part_examined if series is not None else None
    instances = classifiable_instances(session, study_uid)
    pediatric = study_pediatric(store, instances[0]) if instances else None
    return resolve_policy(
        session, modality=CLASSIFIABLE_MODALITY, body_part=body_part, pediatric=pediatric
    )


def study_pediatric(store: InstanceStore, instance: Instance) -> bool | None:
    try:
        header = pydicom.dcmread(store.absolute(instance.path), stop_before_pixels=True)
    except (OSError, ValueError, EOFError, InvalidDicomError):
        log.warning("instance %s: header unreadable; pediatric unknown", instance.sop_instance_uid)
        return None
    return is_pediatric(header)


def is_pediatric(ds: Dataset) -> bool | None:
    """Whether the patient was younger than PEDIATRIC_BELOW_YEARS at the study: from Patient's
    Age ("012Y"), else from Patient's Birth Date and the Study Date; None when unknown."""
    age = _age_years(str(ds.get("PatientAge") or ""))
    if age is None:
        age = _years_between(ds.get("PatientBirthDate"), ds.get("StudyDate"))
    return None if age is None else age < PEDIATRIC_BELOW_YEARS


def _age_years(text: str) -> float | None:
    """Years in an AS value (nnnD, nnnW, nnnM or nnnY); None when it is not one."""
    text = text.strip().upper()
    if len(text) != 4 or not text[:3].isdigit() or text[3] not in _AGE_UNIT_YEARS:
        return None
    return int(text[:3]) * _AGE_UNIT_YEARS[text[3]]


def _years_between(birth: object, study: object) -> float | None:
    """Whole years from a DA birth date to a DA study date; None when either is unknown."""
    try:
        born = date(int(str(birth)[:4]), int(str(birth)[4:6]), int(str(birth)[6:8]))
        seen = date(int(str(study)[:4]), int(str(study)[4:6]), int(str(study)[6:8]))
    except ValueError:  # empty, partial or not a date
        return None
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    return float(years) if years >= 0 else None


def execute(ctx: JobContext, job_id: str, progress: Callable[[int, int], None]) -> Result:
    """The body of a classify job (services/core/runner.py runs its lifecycle)."""
    with ctx.sessions() as session:
        job = jobs.get_job(session, job_id)
        study_uid, cr, syntax, model = job.study_uid, job.cr, job.syntax, job.model
    return _classify(ctx, job_id, study_uid, CompressionRatio(cr), syntax, model, progress)


def _classify(
    ctx: JobContext,
    job_id: str,
    study_uid: str,
    cr: CompressionRatio,
    syntax: str,
    model: str,
    progress: Callable[[int, int], None],
) -> Result:
    started = time.perf_counter()
    with ctx.sessions() as session:
        job = jobs.get_job(session, job_id)
        policy_source, requested_cr = job.policy_source, job.requested_cr
        options = dict(job.options or {})
        store = options.get("store", True)
        instances = job_instances(session, job)
    if not instances:
        raise InvalidInput(f"study {study_uid} has no image the model can read any more")
    datasets = [(i.sop_instance_uid, read_dataset(ctx.store.absolute(i.path))) for i in instances]
    classifier = ctx.classifier(model)
    classification = classify_datasets(
        datasets, classifier, cr=cr, syntax=syntax, threads=ctx.settings.threads, on_image=progress
    )
    classified_at = time.perf_counter()
    result_id = str(uuid.uuid4())
    sources = {str(ds.SOPInstanceUID): ds for _, ds in datasets}
    overlays = _write_overlays(
        ctx.results_dir(result_id), classification, sources, ctx.settings.threads
    )
    outputs = (
        _store_outputs(
            ctx,
            classification,
            sources,
            overlays,
            job_id=job_id,
            result_id=result_id,
            card=classifier.card,
            policy_source=policy_source,
            requested_cr=requested_cr,
            options=options,
        )
        if store
        else {"stored_in_study": False}
    )
    finished = time.perf_counter()
    payload = result_payload(
        classification,
        card=classifier.card,
        provider=classifier.provider,
        job_id=job_id,
        result_id=result_id,
        requested_cr=requested_cr,
        policy_source=policy_source,
        outputs=outputs,
        overlays=sorted(overlays),
        timings_ms={
            "classify": (classified_at - started) * 1000,
            "outputs": (finished - classified_at) * 1000,
            "total": (finished - started) * 1000,
        },
    )
    return Result(id=result_id, job_id=job_id, study_uid=study_uid, payload=payload)


def _write_overlays(
    folder: Path, classification: Classification, sources: dict[str, Dataset], threads: int = 0
) -> dict[str, Image.Image]:
    """A preview-sized saliency overlay PNG per classified image, named by SOP UID.

    The images are rendered in parallel threads (numpy, Pillow's resize and zlib release the
    GIL): on 2 cores four 13.6 MP overlays take about half the time of one after the other.
    """
    from services.core.inference.breasts import window_of
    from services.core.inference.overlay import render_preview, write_png

    (folder / "overlays").mkdir(parents=True, exist_ok=True)
    todo = [
        (image, saliency)
        for image in classification.images
        if image.decoded is not None
        and (saliency := classification.saliency.get(image.input_sop_instance_uid)) is not None
    ]

    def render(item: tuple[TranscodeResult, npt.NDArray[np.float32]]) -> Image.Image:
        image, saliency = item
        assert image.decoded is not None
        ds = sources[image.input_sop_instance_uid]
        preview = render_preview(
            image.decoded.reshape(image.decoded.shape[-2:]),
            saliency,
            bits_stored=int(ds.BitsStored),
            photometric=str(ds.PhotometricInterpretation),
            window=window_of(ds),
            max_side=OVERLAY_MAX_SIDE,
        )
        write_png(folder / "overlays" / f"{image.input_sop_instance_uid}.png", preview)
        return preview

    workers = max(1, min(len(todo), threads or len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers, thread_name_prefix="overlay") as pool:
        previews = list(pool.map(render, todo))
    return {image.input_sop_instance_uid: p for (image, _), p in zip(todo, previews, strict=True)}


def _store_outputs(
    ctx: JobContext,
    classification: Classification,
    sources: dict[str, Dataset],
    overlays: dict[str, Image.Image],
    *,
    job_id: str,
    result_id: str,
    card: ModelCard,
    policy_source: str,
    requested_cr: float | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Derived series, overlay captures and the SR, each through the one ingest path; then
    the job's forward action (the policy's ``forward_to``/``forward_what``, else every output
    to CRGATE_FORWARD_TO)."""
    from services.core.dicom import results as objects

    derived = objects.derived_series(classification, job_id=job_id)
    captures = objects.overlay_captures(classification, sources, overlays, job_id=job_id)
    report = objects.findings_report(
        classification,
        sources,
        job_id=job_id,
        result_id=result_id,
        model_name=card.name,
        model_version=card.version,
        policy_source=policy_source,
        requested_cr=requested_cr,
        outputs=[*derived, *captures],
    )
    stored: dict[str, Any] = {"derived": [], "overlays": [], "report": None}
    what = set(options.get("forward_what") or DEFAULT_FORWARD_WHAT)
    outputs: list[ForwardObject] = []
    if "originals" in what:
        outputs += [
            ForwardObject(str(ds.StudyInstanceUID), uid, "original", job_id)
            for uid, ds in sources.items()
        ]
    for key, datasets in (("derived", derived), ("overlays", captures), ("report", [report])):
        for ds in datasets:
            r = ctx.outputs_ingestor.ingest_dataset(
                ds, channel=Channel.WORKER, source=f"job:{job_id}"
            )
            ref = reference(r.series_uid, r.sop_instance_uid, r.sop_class_uid)
            if key == "report":
                stored[key] = ref
            else:
                stored[key].append(ref)
            kind = "compressed" if key == "derived" else "results"
            if kind in what:
                role = "compressed" if key == "derived" else "result"
                outputs.append(ForwardObject(r.study_uid, r.sop_instance_uid, role, job_id))
    study_uid = outputs[0].study_uid if outputs else ""
    forwarded = forward_result(  # never raises
        ctx, job_id, study_uid, outputs, options.get("forward_to")
    )
    if forwarded is not None:
        stored["forwarded"] = forwarded
    return stored


def reference(series_uid: str, sop_uid: str, sop_class_uid: str) -> dict[str, str]:
    return {"series_uid": series_uid, "sop_instance_uid": sop_uid, "sop_class_uid": sop_class_uid}


def result_payload(
    classification: Classification,
    *,
    card: ModelCard,
    provider: str,
    job_id: str,
    result_id: str,
    requested_cr: float | None,
    policy_source: str,
    outputs: dict[str, Any],
    overlays: list[str],
    timings_ms: dict[str, float],
) -> dict[str, Any]:
    """The JSON result: model, CRs, per breast and per image figures, outputs, timings."""
    from services.core.dicom.results import instance_uid

    data = classification.as_dict()
    for image in data["images"]:  # the derived copy as stored, not the transcode's own UID
        image["output_sop_instance_uid"] = instance_uid(
            job_id, "derived", image["input_sop_instance_uid"]
        )
    return {
        "kind": JobKind.CLASSIFY.value,
        "result_id": result_id,
        "job_id": job_id,
        "study_uid": classification.breasts[0].study_uid if classification.breasts else None,
        "model": {
            "name": card.name,
            "version": card.version,
            "sha256": card.sha256,
            "provider": provider,  # the ONNX Runtime execution provider that ran it
        },
        "requested_cr": requested_cr,
        "applied_cr": classification.cr,
        "policy": policy_source,
        "breasts": data["breasts"],
        "images": data["images"],
        "saliency_method": data["breasts"][0]["saliency_method"] if data["breasts"] else None,
        "outputs": outputs,
        "overlays": overlays,
        "timings_ms": {k: round(v, 1) for k, v in timings_ms.items()},
        "not_for_clinical_use": "model trained on synthetic phantoms",
    }


def job_view(session: Session, job_id: str) -> dict[str, Any]:
    """A job as the API shows it."""
    job = jobs.get_job(session, job_id)
    return {
        "id": job.id,
        "kind": job.kind,
        "study_uid": job.study_uid,
        "status": job.status,
        "reason": job.reason,
        "cr": job.cr,
        "requested_cr": job.requested_cr,
        "syntax": job.syntax,
        "model": job.model or None,
        "model_sha256": job.model_sha256 or None,
        "options": job.options or {},
        "policy": job.policy_source,
        "trigger": job.trigger,
        "progress": {"done": job.progress_done, "total": job.progress_total},
        "attempts": job.attempts,
        "result_id": job.result_id,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "done": job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED),
    }
