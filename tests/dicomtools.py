"""Independent checkers: dicom3tools' dciodvfy and GDCM's gdcmconv. Missing tools fail loudly."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.uid import HTJ2K, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL

HTJ2K_SYNTAXES = (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} not found: install the Debian package {package} (make test does)"
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines for ``path``, with the file-specific prefix removed.

    dicom3tools (Debian bookworm) does not know the HTJ2K transfer syntaxes: an HTJ2K file is
    checked as a copy relabelled JPEG 2000 (dciodvfy checks attributes, not codestreams).
    """
    exe = require("dciodvfy", "dicom3tools")
    ds = pydicom.dcmread(path, stop_before_pixels=False)
    if ds.file_meta.TransferSyntaxUID in HTJ2K_SYNTAXES:
        ds.file_meta.TransferSyntaxUID = JPEG2000
        path = path.with_name(f"{path.stem}.as-j2k.dcm")
        ds.save_as(path)
    proc = subprocess.run(
        [exe, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    output = proc.stdout + proc.stderr
    return sorted({line.strip() for line in output.splitlines() if line.startswith("Error")})


def dciodvfy_new_errors(source: Path, output: Path) -> list[str]:
    """Errors dciodvfy reports on ``output`` that it did not report on ``source``."""
    before = set(dciodvfy_errors(source))
    return [e for e in dciodvfy_errors(output) if e not in before]


def gdcm_decode(path: Path, workdir: Path) -> npt.NDArray[Any]:
    """Pixels of ``path`` as GDCM decodes them (gdcmconv --raw, then read uncompressed).

    GDCM 3.0 (Debian bookworm) does not know the HTJ2K transfer syntaxes; its JPEG 2000 codec
    (the system's OpenJPEG 2.5) reads HT codestreams, so an HTJ2K file is decoded from a copy
    relabelled JPEG 2000: the codestreams GDCM decodes are crgate's, byte for byte.
    """
    exe = require("gdcmconv", "libgdcm-tools")
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID in HTJ2K_SYNTAXES:
        ds.file_meta.TransferSyntaxUID = JPEG2000
        path = workdir / f"{path.stem}.as-j2k.dcm"
        ds.save_as(path)
    raw = workdir / f"{path.stem}.gdcm-raw.dcm"
    proc = subprocess.run(
        [exe, "--raw", str(path), str(raw)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"gdcmconv failed on {path}: {proc.stderr.strip()}"
    decoded = pydicom.dcmread(raw)
    return np.asarray(decoded.pixel_array)
