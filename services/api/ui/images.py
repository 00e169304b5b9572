"""Images for the console's study page, rendered on the server at the size the page shows them.

``/ui/render/{sop}.png`` is any stored image (the original, or the compressed copy a result
made), windowed; ``/ui/difference/{result}/{sop}.png`` is |original - copy| of one image of a
result, amplified so that ``scale`` stored units (default: the image's maximum error) are white.
Both take ``viewport=w,h[,sx,sy,sw,sh]`` like WADO-RS rendered, so a 13.6 MP mammogram goes out
as a PNG the size of its pane (or of the zoomed pane), never whole.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam
from fastapi.responses import Response
from PIL import Image
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from services.api.deps import StateDep, require
from services.core.auth import Role
from services.core.db import repository
from services.core.db.tables import Result
from services.core.dicom.mediatype import PNG
from services.core.dicom.uids import validate_uid
from services.core.errors import InvalidParameter, NotFound
from services.core.retrieve.framecache import FrameCache
from services.core.retrieve.lookup import StoredInstance, read_instance, stored_instance
from services.core.retrieve.rendering import RenderParams, parse_render_params, render
from services.runtime import Runtime

router = APIRouter(tags=["console"], dependencies=[Depends(require(Role.VIEWER))])

UID = Annotated[str, PathParam(pattern=r"^[0-9.]{1,64}$")]
Viewport = Annotated[str | None, Query(max_length=80, description="w,h[,sx,sy,sw,sh]")]
NO_STORE = {"Cache-Control": "private, max-age=300"}


def _instance(state: Runtime, session: Session, sop: str) -> StoredInstance:
    """A stored instance by SOP Instance UID, or a copy kept among a result's files only
    (``store=false``)."""
    validate_uid(sop, "SOP Instance UID")
    row = repository.get_instance(session, sop_instance_uid=sop)
    if row is not None:
        return stored_instance(state.store, row)
    raise NotFound(f"image {sop} is not stored here")


def _kept_copy(state: Runtime, result_id: str, sop: str) -> StoredInstance | None:
    path: Path = state.job_context.results_dir(result_id) / "copies" / f"{sop}.dcm"
    if not path.is_file():
        return None
    return StoredInstance("", "", sop, "", path, 1, True)


@router.get(
    "/ui/render/{sop}.png",
    summary="Console: one stored image as PNG at the viewport's size",
    include_in_schema=False,
)
async def render_image(
    sop: UID,
    state: StateDep,
    viewport: Viewport = None,
    window: Annotated[str | None, Query(max_length=80)] = None,
    result: Annotated[str | None, Query(max_length=36)] = None,
) -> Response:
    params = parse_render_params(PNG, window=window, viewport=viewport)
    with state.sessions() as session:
        try:
            instance = _instance(state, session, sop)
        except NotFound:
            known = result is not None and session.get(Result, result) is not None
            kept = _kept_copy(state, result, sop) if known and result else None
            if kept is None:
                raise
            instance = kept
    png = await run_in_threadpool(render, instance, 1, params, state.frames)
    return Response(png, media_type=PNG, headers=NO_STORE)


@router.get(
    "/ui/difference/{result_id}/{sop}.png",
    summary="Console: |original - compressed copy| of one image of a result, amplified",
    include_in_schema=False,
)
async def difference_image(
    result_id: Annotated[str, PathParam(max_length=36)],
    sop: UID,
    state: StateDep,
    viewport: Viewport = None,
    scale: Annotated[float | None, Query(gt=0, le=1e9, description="units shown white")] = None,
) -> Response:
    params = parse_render_params(PNG, viewport=viewport)
    with state.sessions() as session:
        row = session.get(Result, result_id)
        if row is None:
            raise NotFound(f"no result {result_id!r}")
        image = _image_of(row.payload, sop)
        original = _instance(state, session, sop)
        copy_uid = str(image["output_sop_instance_uid"])
        try:
            copy = _instance(state, session, copy_uid)
        except NotFound:
            kept = _kept_copy(state, result_id, copy_uid)
            if kept is None:
                raise
            copy = kept
    white = scale or float(image.get("max_abs_error") or 1) or 1.0
    png = await run_in_threadpool(_difference_png, original, copy, white, params, state.frames)
    return Response(png, media_type=PNG, headers=NO_STORE)


def _image_of(payload: Any, sop: str) -> dict[str, Any]:
    for image in payload.get("images") or []:
        if image.get("input_sop_instance_uid") == sop and image.get("output_sop_instance_uid"):
            return dict(image)
    raise NotFound(f"the result has no compressed copy of image {sop}")


def _difference_png(
    original: StoredInstance,
    copy: StoredInstance,
    white: float,
    params: RenderParams,
    frames: FrameCache,
) -> bytes:
    a = frames.frame(original, read_instance(original), 0).astype(np.float64)
    b = frames.frame(copy, read_instance(copy), 0).astype(np.float64)
    if a.shape != b.shape:
        raise InvalidParameter(
            f"the copy is {b.shape} and the original {a.shape}: no pixel difference"
        )
    diff = np.abs(a - b)
    if diff.ndim == 3:
        diff = diff.max(axis=2)
    if params.region is not None:
        sx, sy, sw, sh = params.region
        diff = diff[sy : sy + sh, sx : sx + sw]
        if diff.size == 0:
            raise InvalidParameter("viewport source region starts outside the image")
    if params.viewport is not None:
        w, h = params.viewport
        factor = int(1 / min(w / diff.shape[1], h / diff.shape[0], 1.0))
        if factor >= 2:  # shrink by block maxima: a few wrong pixels stay visible
            rows, cols = diff.shape[0] // factor, diff.shape[1] // factor
            if rows and cols:
                blocks = diff[: rows * factor, : cols * factor]
                diff = blocks.reshape(rows, factor, cols, factor).max(axis=(1, 3))
    grey = np.clip(diff / white, 0.0, 1.0)
    picture = Image.fromarray(np.round(grey * 255).astype(np.uint8))
    if params.viewport is not None:
        w, h = params.viewport
        ratio = min(w / picture.width, h / picture.height)
        size = (max(1, round(picture.width * ratio)), max(1, round(picture.height * ratio)))
        if size != picture.size:
            picture = picture.resize(size, Image.Resampling.BOX)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()
