"""Rendered images and thumbnails (PS3.18 8.3.5): one frame as PNG or JPEG, windowed, fitted."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from services.core.dicom.mediatype import JPEG, PNG
from services.core.retrieve.errors import InvalidQuery
from services.core.retrieve.framecache import FrameCache
from services.core.retrieve.frames import check_frames, decode
from services.core.retrieve.lookup import StoredInstance, read_instance
from services.core.retrieve.windowing import FUNCTIONS, Window, colour_to_unit, grey_to_bytes

THUMBNAIL_SIZE = 128  # pixels: the box a thumbnail fits in when no viewport is given
MAX_VIEWPORT = 8192
DEFAULT_JPEG_QUALITY = 90


@dataclass(frozen=True)
class RenderParams:
    """What a rendered request asks for."""

    media_type: str = PNG
    window: Window | None = None
    viewport: tuple[int, int] | None = None  # fit the output inside (width, height)
    region: tuple[int, int, int, int] | None = None  # source crop: x, y, width, height
    quality: int = DEFAULT_JPEG_QUALITY


def parse_render_params(
    media_type: str,
    *,
    window: str | None = None,
    viewport: str | None = None,
    quality: str | None = None,
    thumbnail: bool = False,
) -> RenderParams:
    """PS3.18 8.3.5 query parameters; InvalidQuery (400) saying what is wrong."""
    params = RenderParams(media_type=media_type)
    if window is not None:
        params = replace(params, window=_parse_window(window))
    if viewport is not None:
        size, region = _parse_viewport(viewport)
        params = replace(params, viewport=size, region=region)
    elif thumbnail:
        params = replace(params, viewport=(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    if quality is not None:
        try:
            value = int(quality)
        except ValueError:
            value = 0
        if not 1 <= value <= 100:
            raise InvalidQuery(f"quality={quality!r}: use an integer from 1 to 100")
        params = replace(params, quality=value)
    return params


def _parse_window(text: str) -> Window:
    parts = [p.strip() for p in text.split(",")]
    usage = "use window=center,width[,function] with function linear, linear-exact or sigmoid"
    if len(parts) not in (2, 3):
        raise InvalidQuery(f"window={text!r}: {usage}")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise InvalidQuery(f"window={text!r}: center and width must be numbers; {usage}") from None
    function = FUNCTIONS.get(parts[2].lower()) if len(parts) == 3 else "linear"
    if function is None:
        raise InvalidQuery(f"window={text!r}: unknown function {parts[2]!r}; {usage}")
    if not (math.isfinite(center) and math.isfinite(width)):
        raise InvalidQuery(f"window={text!r}: center and width must be finite")
    if width < 1 if function == "linear" else width <= 0:
        raise InvalidQuery(
            f"window={text!r}: width must be >= 1 for linear, > 0 otherwise (PS3.3 C.11.2.1.2)"
        )
    return Window(center, width, function)


def _parse_viewport(text: str) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    usage = "use viewport=width,height or viewport=width,height,sx,sy,sw,sh (pixels)"
    try:
        values = [int(p) for p in text.split(",")]
    except ValueError:
        raise InvalidQuery(f"viewport={text!r}: {usage}") from None
    if len(values) not in (2, 6):
        raise InvalidQuery(f"viewport={text!r}: {usage}")
    width, height = values[:2]
    if not (1 <= width <= MAX_VIEWPORT and 1 <= height <= MAX_VIEWPORT):
        raise InvalidQuery(f"viewport={text!r}: width and height must be 1..{MAX_VIEWPORT}")
    region = None
    if len(values) == 6:
        sx, sy, sw, sh = values[2:]
        if sx < 0 or sy < 0 or sw < 1 or sh < 1:
            raise InvalidQuery(
                f"viewport={text!r}: the source region needs sx, sy >= 0 and sw, sh >= 1"
            )
        region = (sx, sy, sw, sh)
    return (width, height), region


def render(
    instance: StoredInstance, frame: int, params: RenderParams, frames: FrameCache | None = None
) -> bytes:
    """Frame ``frame`` (1-based) as a PNG or JPEG, windowed and fitted as ``params`` say;
    ``frames`` keeps decoded frames for the next request (the console's panes)."""
    check_frames(instance, [frame])
    ds = read_instance(instance)
    if frames is not None:
        array = frames.frame(instance, ds, frame - 1)
    else:
        array = decode(ds, frame - 1, instance.source)
    if array.ndim == 2:
        invert = str(ds.PhotometricInterpretation).strip() == "MONOCHROME1"
        pixels = grey_to_bytes(ds, array, params.window, invert=invert)
    else:
        pixels = np.round(colour_to_unit(ds, array, params.window) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if params.region is not None:
        sx, sy, sw, sh = params.region
        if sx >= image.width or sy >= image.height:
            raise InvalidQuery(
                f"viewport source region starts outside the {image.width}x{image.height} image"
            )
        image = image.crop((sx, sy, min(sx + sw, image.width), min(sy + sh, image.height)))
    if params.viewport is not None:
        image = _fit(image, *params.viewport)
    out = io.BytesIO()
    if params.media_type == JPEG:
        image.save(out, format="JPEG", quality=params.quality)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    # a box reduction first, then Lanczos over the last factor of 3: 13.6 MP to a pane in a
    # third of the time, no visible difference
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
