"""What every ``crgate`` command shares: output, the one-line error exit, settings from the
command line, logging, progress bars, input file lists, CR lists."""

from __future__ import annotations

import getpass
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from services.core.config import Settings
from services.core.errors import InvalidParameter
from services.core.ratio import CompressionRatio, parse_cr_list

out = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="where crgate keeps files and its SQLite index [env CRGATE_DATA_DIR, ./var]",
    ),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` as one line on stderr; raise the returned Exit."""
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def settings_from(**overrides: Any) -> Settings:
    """Settings from the environment, with the command line's options on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def progress(enabled: bool = True) -> Progress:
    """A progress bar on stderr that disappears when done (off: ``enabled`` False)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not enabled,
        transient=True,
    )


def _is_part10(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def expand(inputs: Iterable[Path]) -> tuple[list[Path], int]:
    """Files as given; folders walked recursively for DICOM Part 10 files (hidden ones skipped).

    Returns the files and how many non-DICOM files the folder walk passed over.
    """
    files: list[Path] = []
    skipped = 0
    for path in inputs:
        if not path.is_dir():
            files.append(path)
            continue
        for found in sorted(path.rglob("*")):
            if not found.is_file() or any(p.startswith(".") for p in found.relative_to(path).parts):
                continue
            if _is_part10(found):
                files.append(found)
            else:
                skipped += 1
    return files, skipped


def cr_list(text: str, option: str) -> list[CompressionRatio]:
    """A CR list option (``--crs 1,15,25``), each a valid CR; InvalidParameter names the option."""
    return parse_cr_list(text, option)


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidParameter(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidParameter(f"{path}: expected a JSON object of PhantomConfig fields")
    return data


def actor() -> str:
    """Who a CLI change is audit-logged as: ``cli:<user>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = str(os.getuid())
    return f"cli:{user}"
