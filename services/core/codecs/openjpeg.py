"""Raw JPEG 2000 codestreams through OpenJPEG's C API (via glymur.lib.openjp2), and decoding.

glymur's high-level ``Jp2k`` writer declares 8 or 16 bits of precision whatever the data's real
depth, and OpenJPEG's rate is relative to the declared precision. DICOM wants the codestream to
declare precision = Bits Stored and signedness = Pixel Representation, so this module builds the
``opj_image_t`` itself. One call encodes one frame at one OpenJPEG rate; rate control towards a
target compression ratio lives in :mod:`services.core.codecs.jpeg2000`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.core.errors import CodecError, CodecUnavailable

_MIN_OPENJPEG = (2, 4, 0)
_TEMP_DIR = "/dev/shm" if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None


def _openjp2() -> Any:
    """Return glymur's low-level binding, or raise CodecUnavailable naming the Debian package."""
    try:
        from glymur import version
        from glymur.lib import openjp2
    except ImportError as exc:  # pragma: no cover - glymur is a hard dependency
        raise CodecUnavailable(f"glymur is not installed ({exc}): pip install glymur") from None
    if openjp2.OPENJP2 is None:
        raise CodecUnavailable(
            "OpenJPEG library libopenjp2 not found: install the Debian package libopenjp2-7 "
            "(apt-get install libopenjp2-7)"
        )
    found = tuple(int(p) for p in version.openjpeg_version.split(".")[:3])
    if found < _MIN_OPENJPEG:
        raise CodecUnavailable(
            f"OpenJPEG {version.openjpeg_version} is too old (need >= 2.4 for threads): "
            "upgrade the Debian package libopenjp2-7"
        )
    return openjp2


def openjpeg_available() -> bool:
    """True when crgate can encode JPEG 2000 here (libopenjp2 >= 2.4 through glymur)."""
    try:
        _openjp2()
    except CodecUnavailable:
        return False
    return True


def openjpeg_version() -> str:
    """Version of the libopenjp2 that crgate encodes with."""
    _openjp2()
    from glymur import version

    return str(version.openjpeg_version)


def default_threads() -> int:
    """Every core this process may use."""
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class EncodeParams:
    """How to encode one frame.

    ``rate`` is OpenJPEG's ``tcp_rates[0]``: the ratio relative to the *declared* precision
    (``rows * cols * samples * bits_stored / 8`` bytes); ``None`` codes every pass
    (lossless with the reversible 5/3 wavelet).
    """

    bits_stored: int
    signed: bool
    reversible: bool
    rate: float | None
    threads: int = 0  # 0 = every core
    resolutions: int = 6
    codeblock: int = 64  # code-block width and height; smaller gives finer rate steps


def resolutions_for(rows: int, cols: int, wanted: int = 6) -> int:
    """Largest resolution count <= ``wanted`` that OpenJPEG accepts for this frame size."""
    smallest = max(1, min(rows, cols))
    levels = 1
    while levels < wanted and (1 << levels) <= smallest:
        levels += 1
    return levels


@contextlib.contextmanager
def _temp_path(suffix: str) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix="crgate-", suffix=suffix, dir=_TEMP_DIR)
    os.close(fd)
    path = Path(name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def encode_frame(frame: npt.NDArray[Any], params: EncodeParams) -> bytes:
    """Encode one frame, shape (rows, cols) or (rows, cols, 3), to a raw J2K codestream.

    Three-sample frames use the multiple component transform (ICT for irreversible, RCT for
    reversible coding), as DICOM's YBR_ICT / YBR_RCT require.
    """
    opj = _openjp2()
    if frame.ndim == 2:
        frame = frame[:, :, np.newaxis]
    rows, cols, samples = frame.shape
    lo, hi = _value_range(params.bits_stored, params.signed)
    if frame.size and (int(frame.min()) < lo or int(frame.max()) > hi):
        raise CodecError(
            f"pixel values {int(frame.min())}..{int(frame.max())} do not fit Bits Stored "
            f"{params.bits_stored} ({'signed' if params.signed else 'unsigned'})"
        )

    cparams = opj.set_default_encoder_parameters()
    cparams.codec_fmt = opj.CODEC_J2K
    cparams.irreversible = 0 if params.reversible else 1
    cparams.numresolution = min(params.resolutions, resolutions_for(rows, cols))
    cparams.tcp_numlayers = 1
    cparams.tcp_rates[0] = 0.0 if params.rate is None else float(params.rate)
    cparams.cp_disto_alloc = 1
    cparams.cblockw_init = params.codeblock
    cparams.cblockh_init = params.codeblock
    cparams.tcp_mct = 1 if samples == 3 else 0

    comptparms = (opj.ImageComptParmType * samples)()
    for k in range(samples):
        comptparms[k].dx = 1
        comptparms[k].dy = 1
        comptparms[k].w = cols
        comptparms[k].h = rows
        comptparms[k].x0 = 0
        comptparms[k].y0 = 0
        comptparms[k].prec = params.bits_stored
        comptparms[k].bpp = params.bits_stored
        comptparms[k].sgnd = 1 if params.signed else 0

    colour = opj.CLRSPC_SRGB if samples == 3 else opj.CLRSPC_GRAY
    threads = params.threads or default_threads()
    with contextlib.ExitStack() as stack, _temp_path(".j2k") as path:
        image = opj.image_create(comptparms, colour)
        stack.callback(opj.image_destroy, image)
        image.contents.x0 = 0
        image.contents.y0 = 0
        image.contents.x1 = cols
        image.contents.y1 = rows
        for k in range(samples):
            dest = np.ctypeslib.as_array(
                ctypes.cast(image.contents.comps[k].data, ctypes.POINTER(ctypes.c_int32)),
                shape=(rows, cols),
            )
            dest[...] = frame[:, :, k]

        codec = opj.create_compress(opj.CODEC_J2K)
        stack.callback(opj.destroy_codec, codec)
        opj.set_info_handler(codec, None)
        opj.set_warning_handler(codec, None)
        opj.set_error_handler(codec, opj._ERROR_CALLBACK)
        try:
            opj.setup_encoder(codec, cparams, image)
            opj.codec_set_threads(codec, threads)
            stream = opj.stream_create_default_file_stream(str(path), False)
            stack.callback(opj.stream_destroy, stream)
            opj.start_compress(codec, image, stream)
            opj.encode(codec, stream)
            opj.end_compress(codec, stream)
        except opj.OpenJPEGLibraryError as exc:
            raise CodecError(f"OpenJPEG failed to encode a {cols}x{rows} frame: {exc}") from None
        stack.close()  # flush and close the stream before reading the file back
        return strip_comments(path.read_bytes())


def strip_comments(codestream: bytes) -> bytes:
    """Drop COM segments from the main header (OpenJPEG always writes its own comment).

    The main header runs from SOC to the first SOT; tile-part lengths are unaffected.
    """
    if codestream[:2] != b"\xff\x4f":
        raise CodecError("OpenJPEG returned something that is not a J2K codestream")
    out = bytearray(codestream[:2])
    pos = 2
    while pos + 4 <= len(codestream):
        marker = codestream[pos : pos + 2]
        if marker == b"\xff\x90":  # SOT: end of the main header
            break
        length = int.from_bytes(codestream[pos + 2 : pos + 4], "big")
        if marker != b"\xff\x64":  # keep everything but COM
            out += codestream[pos : pos + 2 + length]
        pos += 2 + length
    out += codestream[pos:]
    return bytes(out)


def decode_codestream(codestream: bytes, threads: int = 0) -> npt.NDArray[Any]:
    """Decode a raw J2K or HTJ2K codestream to (rows, cols) or (rows, cols, samples), in memory.

    The decoder is OpenJPEG (>= 2.5, which reads HT code-blocks) as bundled in imagecodecs: no
    temporary file and no process-wide option. Multi-component codestreams come back with the
    inverse component transform applied (RGB).
    """
    try:
        import imagecodecs
    except ImportError:  # pragma: no cover - imagecodecs is a hard dependency
        raise CodecUnavailable("imagecodecs is not installed: pip install imagecodecs") from None
    try:
        data: npt.NDArray[Any] = imagecodecs.jpeg2k_decode(
            codestream, numthreads=threads or default_threads()
        )
    except Exception as exc:  # imagecodecs raises its own error types
        raise CodecError(f"OpenJPEG failed to decode a codestream: {exc}") from None
    return data


def _value_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1
