"""WADO-RS (PS3.18 10.4): instances, metadata, frames, bulk data, rendered images, thumbnails.

Whole instances go out as multipart/related (files read in chunks, one transcode at a time);
frames and bulk data as multipart/related or, asked for bare, one part. Bodies whose length is
known (stored files, frames, bulk data, one transcoded instance) answer byte ranges;
what can be sent is negotiated in services.core.retrieve.negotiation; a 406 problem lists what
is offered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from services.api.deps import READ_DICOMWEB, StateDep
from services.api.dicomweb.endpoints import FRAMES, INSTANCE, SERIES, STUDY, add_level_route
from services.api.ranges import Segment, ranged_response
from services.core.dicom.dicomjson import to_dicom_json
from services.core.dicom.mediatype import DICOM, DICOM_JSON, OCTET, format_media_type
from services.core.dicom.multipart import (
    RELATED,
    Part,
    closing,
    iter_multipart,
    new_boundary,
    part_head,
    stable_boundary,
)
from services.core.errors import NotFound
from services.core.retrieve.bulkdata import bulk_value, pixel_data_bytes
from services.core.retrieve.errors import InvalidQuery, NotAcceptable
from services.core.retrieve.frames import check_frames, extract_frames, parse_frame_list
from services.core.retrieve.lookup import StoredInstance, find_instances, iter_file
from services.core.retrieve.metadata import metadata_dataset
from services.core.retrieve.negotiation import (
    AS_STORED,
    FRAME_OFFERS,
    FrameFormat,
    negotiate_frames,
    negotiate_instances,
    negotiate_metadata,
    negotiate_rendered,
)
from services.core.retrieve.rendering import parse_render_params, render
from services.core.retrieve.transcoding import encode_instance
from services.runtime import Runtime

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(READ_DICOMWEB)])

# study, series and instance retrieve and metadata: one handler each, a route per level
_LEVELS = (("study", STUDY), ("series", SERIES), ("instance", INSTANCE))
_DEPS = {"request": Request, "state": StateDep}
PIXEL_DATA_TAG = "7FE00010"


# -- helpers -----------------------------------------------------------------------------------


async def _find(
    state: Runtime, study: str, series: str | None = None, sop: str | None = None
) -> list[StoredInstance]:
    return await run_in_threadpool(
        find_instances, state.sessions, state.store, study=study, series=series, sop=sop
    )


async def _one(state: Runtime, study: str, series: str, sop: str) -> StoredInstance:
    (instance,) = await _find(state, study, series, sop)
    return instance


def _accept(request: Request) -> str | None:
    return request.headers.get("accept")


def _related_type(part_type: str, boundary: str, syntax: str | None) -> str:
    """``multipart/related; type="<part_type>"[; transfer-syntax=<syntax>]; boundary=<boundary>``"""
    params = {"type": part_type, "transfer-syntax": syntax, "boundary": boundary}
    return format_media_type(RELATED, {k: v for k, v in params.items() if v is not None})


def _framed(parts: Sequence[tuple[str, Segment]], boundary: str) -> list[Segment]:
    """A multipart body as segments: each part's head, its body (bytes or a file), CRLF."""
    segments: list[Segment] = []
    for content_type, body in parts:
        segments += [part_head(boundary, {"Content-Type": content_type}), body, b"\r\n"]
    return [*segments, closing(boundary)]


def _check_single(fmt: FrameFormat, count: int) -> None:
    """406 when a bare (single-part) answer is asked for more than one frame."""
    if fmt.single_part and count != 1:
        raise NotAcceptable(
            f"{count} frames come only as multipart/related; ask for one frame", FRAME_OFFERS
        )


def _frames_response(request: Request, data: list[bytes], fmt: FrameFormat) -> Response:
    """Frames or bulk data: a bare part when asked so, else multipart; byte ranges either way."""
    if fmt.single_part:
        _check_single(fmt, len(data))
        etag = stable_boundary("single part", fmt.content_type, *data)
        return ranged_response(request, data, fmt.content_type, etag)
    boundary = stable_boundary(fmt.content_type, *data)  # also the ETag: it fixes the bytes
    body = _framed([(fmt.content_type, d) for d in data], boundary)
    media_type = _related_type(fmt.media_type, boundary, fmt.transfer_syntax)
    return ranged_response(request, body, media_type, boundary)


# -- instances ---------------------------------------------------------------------------------


def _dicom_part(instance: StoredInstance, target: str, threads: int) -> tuple[str, Segment]:
    """The part's Content-Type and body: the stored file itself, or the transcoded bytes."""
    data = encode_instance(instance, target, threads=threads)
    if data is None:
        return f"{DICOM}; transfer-syntax={instance.transfer_syntax_uid}", instance.path
    return f"{DICOM}; transfer-syntax={target}", data


def _streamed(part: tuple[str, Segment]) -> Part:
    content_type, body = part
    return {"Content-Type": content_type}, [body] if isinstance(body, bytes) else iter_file(body)


def _logged(chunks: Iterator[bytes], what: str) -> Iterator[bytes]:
    """Log a failure after the response started (the client sees a cut-off body)."""
    try:
        yield from chunks
    except Exception:
        log.exception("WADO-RS response for %s aborted mid-stream", what)
        raise


async def _instances_response(
    request: Request, state: Runtime, study: str, series: str | None = None, sop: str | None = None
) -> Response:
    """Files that go out as stored, or one transcoded instance, make a body of known length
    (byte ranges work); several transcoded instances stream, one transcode at a time."""
    instances = await _find(state, study, series, sop)
    target = negotiate_instances(_accept(request), {i.transfer_syntax_uid for i in instances})
    threads = state.settings.threads
    syntax = None if target == AS_STORED else target
    # the first part is prepared before the response starts, so its errors get a status code
    first = await run_in_threadpool(_dicom_part, instances[0], target, threads)
    if len(instances) == 1 or all(target in (AS_STORED, i.transfer_syntax_uid) for i in instances):
        parts = [first] + [_dicom_part(i, target, threads) for i in instances[1:]]
        boundary = stable_boundary(target, *(_identity(body) for _, body in parts))
        media_type = _related_type(DICOM, boundary, syntax)
        return ranged_response(request, _framed(parts, boundary), media_type, boundary)
    rest = (_streamed(_dicom_part(i, target, threads)) for i in instances[1:])
    boundary = new_boundary()
    what = f"sop={sop}" if sop else f"series={series}" if series else f"study={study}"
    return StreamingResponse(
        _logged(iter_multipart(chain([_streamed(first)], rest), boundary), what),
        media_type=_related_type(DICOM, boundary, syntax),
    )


def _identity(body: Segment) -> bytes | str:
    """What fixes a part's bytes: the bytes, or a stored file's path, size and modification."""
    if isinstance(body, bytes):
        return body
    stat = body.stat()
    return f"{body}:{stat.st_size}:{stat.st_mtime_ns}"


for _level, _path in _LEVELS:
    add_level_route(router, _path, f"wado_{_level}", _instances_response, deps=_DEPS)


# -- metadata ----------------------------------------------------------------------------------


def _instance_json(instance: StoredInstance, base: str) -> dict[str, Any]:
    ds, pixel_vr = metadata_dataset(instance)
    body = to_dicom_json(ds, bulk_uri=lambda tag: f"{base}/bulkdata/{tag}")
    if pixel_vr is not None:
        body[PIXEL_DATA_TAG] = {"vr": pixel_vr, "BulkDataURI": f"{base}/bulkdata/{PIXEL_DATA_TAG}"}
    return dict(sorted(body.items()))


async def _metadata_response(
    request: Request, state: Runtime, study: str, series: str | None = None, sop: str | None = None
) -> Response:
    negotiate_metadata(_accept(request))
    instances = await _find(state, study, series, sop)
    bases = [
        str(
            request.url_for(
                "wado_instance", study=i.study_uid, series=i.series_uid, sop=i.sop_instance_uid
            )
        )
        for i in instances
    ]

    def build() -> list[dict[str, Any]]:
        return [_instance_json(i, b) for i, b in zip(instances, bases, strict=True)]

    return JSONResponse(await run_in_threadpool(build), media_type=DICOM_JSON)


for _level, _path in _LEVELS:
    add_level_route(
        router, _path + "/metadata", f"{_level}_metadata", _metadata_response, deps=_DEPS
    )


# -- frames and bulk data ----------------------------------------------------------------------


@router.get(FRAMES)
async def retrieve_frames(
    study: str, series: str, sop: str, frames: str, request: Request, state: StateDep
) -> Response:
    numbers = parse_frame_list(frames, state.settings.max_frames_per_request)
    instance = await _one(state, study, series, sop)
    check_frames(instance, numbers)
    fmt = negotiate_frames(_accept(request), instance.transfer_syntax_uid)
    _check_single(fmt, len(numbers))
    data = await run_in_threadpool(
        extract_frames, instance, numbers, fmt, threads=state.settings.threads
    )
    return _frames_response(request, data, fmt)


@router.get(INSTANCE + "/bulkdata/{tag}", name="wado_bulkdata")
async def retrieve_bulkdata(
    study: str, series: str, sop: str, tag: str, request: Request, state: StateDep
) -> Response:
    """Pixel Data: one uncompressed part, or one codestream per frame; other tags: the value."""
    instance = await _one(state, study, series, sop)
    if tag.upper() == PIXEL_DATA_TAG:
        if not instance.is_image:
            raise NotFound(f"{instance.source} has no Pixel Data")
        fmt = negotiate_frames(_accept(request), instance.transfer_syntax_uid)
        data = await run_in_threadpool(
            pixel_data_bytes, instance, fmt, threads=state.settings.threads
        )
    else:
        fmt = negotiate_frames(_accept(request), "")
        if fmt.media_type != OCTET:
            raise NotAcceptable(f"bulk data element {tag} comes only as {OCTET}", FRAME_OFFERS[:1])
        data = [await run_in_threadpool(bulk_value, instance, tag)]
    return _frames_response(request, data, fmt)


# -- rendered and thumbnails -------------------------------------------------------------------


@dataclass(frozen=True)
class _View:
    """One rendered or thumbnail resource: its path, route name and kind."""

    path: str
    name: str  # the route name; OpenAPI derives the summary and operation id from it
    thumbnail: bool  # thumbnails: the first image, 128x128 by default, no window parameter

    @property
    def query_params(self) -> list[str]:
        return ["viewport", "quality"] if self.thumbnail else ["window", "viewport", "quality"]


_VIEWS = (
    _View(INSTANCE + "/rendered", "instance_rendered", thumbnail=False),
    _View(FRAMES + "/rendered", "frame_rendered", thumbnail=False),
    _View(STUDY + "/thumbnail", "study_thumbnail", thumbnail=True),
    _View(SERIES + "/thumbnail", "series_thumbnail", thumbnail=True),
    _View(INSTANCE + "/thumbnail", "instance_thumbnail", thumbnail=True),
    _View(FRAMES + "/thumbnail", "frame_thumbnail", thumbnail=True),
)


async def _render_view(
    view: _View, request: Request, state: Runtime, **params: str | None
) -> Response:
    """One frame (the first unless the path names one) of the first image, as PNG or JPEG.

    A thumbnail looks up its study, series or instance before reading its parameters.
    """
    ids = (str(params["study"]), params.get("series"), params.get("sop"))
    instances = await _find(state, *ids) if view.thumbnail else None
    media_type = negotiate_rendered(_accept(request))
    render_params = parse_render_params(
        media_type,
        window=params.get("window"),
        viewport=params["viewport"],
        quality=params["quality"],
        thumbnail=view.thumbnail,
    )
    frame = 1
    frames = params.get("frames")
    if frames is not None:
        numbers = parse_frame_list(frames)
        if len(numbers) != 1:
            raise InvalidQuery(f"frames {frames!r}: a rendered image shows one frame; ask for one")
        frame = numbers[0]
    if instances is None:
        instances = await _find(state, *ids)
    images = [i for i in instances if i.is_image]
    if not images:
        raise NotFound(f"nothing to render: {instances[0].source} has no Pixel Data")
    image = await run_in_threadpool(render, images[0], frame, render_params)
    return Response(image, media_type=media_type)


for _view in _VIEWS:
    add_level_route(
        router,
        _view.path,
        _view.name,
        partial(_render_view, _view),
        deps=_DEPS,
        query=_view.query_params,
    )
