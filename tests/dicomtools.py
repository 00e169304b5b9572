"""Independent checkers: dicom3tools' dciodvfy and GDCM's gdcmconv. Missing tools fail loudly."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} not found: install the Debian package {package} (make test does)"
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines for ``path``, with the file-specific prefix removed."""
    exe = require("dciodvfy", "dicom3tools")
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
    """Pixels of ``path`` as GDCM decodes them (gdcmconv --raw, then read uncompressed)."""
    exe = require("gdcmconv", "libgdcm-tools")
    raw = workdir / f"{path.stem}.gdcm-raw.dcm"
    proc = subprocess.run(
        [exe, "--raw", str(path), str(raw)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"gdcmconv failed on {path}: {proc.stderr.strip()}"
    ds = pydicom.dcmread(raw)
    return np.asarray(ds.pixel_array)
