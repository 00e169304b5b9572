"""The labelled set of a CR study: breasts (study, laterality) with their CC/MLO files and a label.

Two ways in:

* a ``crgate synth`` folder: its ``truth.csv`` (one row per view, with the file and the lesion
  centre) is the label file, so ``--labels`` is not needed;
* a folder of DICOM mammograms and a CSV of per-breast labels with the columns ``study_uid``,
  ``laterality`` (L/R) and ``label`` (malignant/1/yes/true or benign/normal/0/no/false). A CSV
  with a ``file`` column (per-view rows, like truth.csv) names each view's file, relative to the
  folder; without one, the folder is walked and every DICOM file's header sorted into breasts
  with the classifier's own rules (modality MG, laterality, CC/MLO view).

Every labelled breast must have its images (else InvalidInput naming the first missing ones);
images of breasts the CSV does not label are left out and counted in ``notes``. A breast with
one view is classified with that view in both halves of the input, as the service does.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from services.core.errors import InvalidInput, NotDicom, NotFound
from services.core.inference.breasts import _laterality, _study_uid, _view

TRUTH_FILE = "truth.csv"
POSITIVE = frozenset({"malignant", "1", "yes", "true", "positive"})
NEGATIVE = frozenset({"benign", "normal", "0", "no", "false", "negative"})
_STUDY_COLUMNS = ("study_uid", "studyinstanceuid", "study_instance_uid")
_SHOW = 3  # how many offending breasts or files an error names


@dataclass(frozen=True)
class LabelledBreast:
    study_uid: str
    laterality: str  # "L" or "R"
    label: int  # 1 malignant, 0 benign or normal
    views: dict[str, Path]  # "CC"/"MLO" -> file; one may be missing
    kind: str = ""  # lesion kind (phantoms)
    lesions: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # view -> x, y, r

    @property
    def key(self) -> str:
        return f"{self.study_uid}/{self.laterality}"

    def input_files(self) -> tuple[tuple[str, Path], tuple[str, Path]]:
        """(view, file) for the CC and the MLO half of the input; one view stands in for a
        missing one, as :meth:`~services.core.inference.breasts.Breast.input_views` does."""
        cc, mlo = self.views.get("CC"), self.views.get("MLO")
        if cc is not None and mlo is not None:
            return ("CC", cc), ("MLO", mlo)
        view, only = next(iter(self.views.items()))
        return (view, only), (view, only)


@dataclass(frozen=True)
class LabelledSet:
    breasts: list[LabelledBreast]
    data_dir: Path
    labels_file: Path
    notes: list[str] = field(default_factory=list)

    @property
    def n_malignant(self) -> int:
        return sum(b.label for b in self.breasts)

    @property
    def n_studies(self) -> int:
        return len({b.study_uid for b in self.breasts})

    @property
    def n_views(self) -> int:
        return len({f for b in self.breasts for f in b.views.values()})

    @property
    def single_view(self) -> int:
        return sum(1 for b in self.breasts if len(b.views) == 1)

    def fingerprint(self) -> str:
        """Changes when a breast, a label or a file (name, size, time) changes."""
        items = []
        for b in self.breasts:
            files = []
            for view, path in sorted(b.views.items()):
                st = path.stat()
                files.append([view, str(path.resolve()), st.st_size, st.st_mtime_ns])
            items.append([b.key, b.label, files])
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def load_labelled_set(data_dir: Path, labels: Path | None = None) -> LabelledSet:
    """The breasts of ``data_dir`` with their labels (see the module docstring)."""
    if not data_dir.is_dir():
        raise NotFound(f"data folder {data_dir} not found")
    labels_file = labels if labels is not None else data_dir / TRUTH_FILE
    if not labels_file.is_file():
        hint = "" if labels is not None else " (no truth.csv there: give --labels CSV)"
        raise NotFound(f"labels file {labels_file} not found{hint}")
    rows, columns = _read_rows(labels_file)
    if "file" in columns:
        breasts, notes = _from_file_rows(rows, labels_file, data_dir)
    else:
        breasts, notes = _from_folder(_breast_labels(rows, labels_file), labels_file, data_dir)
    malignant = sum(b.label for b in breasts)
    if malignant == 0 or malignant == len(breasts):
        only = "malignant" if malignant else "benign or normal"
        raise InvalidInput(
            f"{labels_file}: all {len(breasts)} breasts are {only}: AUROC needs both classes"
        )
    return LabelledSet(breasts, data_dir, labels_file, notes)


# ---------------------------------------------------------------------- CSV


def _read_rows(path: Path) -> tuple[list[dict[str, str]], set[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            rows = [
                {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
                for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInput(f"{path}: cannot read the labels CSV ({exc})") from None
    columns = set(fields)
    study = next((c for c in _STUDY_COLUMNS if c in columns), None)
    missing = [c for c in ("laterality", "label") if c not in columns]
    if study is None:
        missing.insert(0, "study_uid")
    if missing:
        raise InvalidInput(
            f"{path}: the labels CSV lacks the column(s) {', '.join(missing)}; it needs "
            "study_uid, laterality (L/R) and label (malignant/benign/normal or 1/0)"
        )
    if not rows:
        raise InvalidInput(f"{path}: the labels CSV has no rows")
    for row in rows:
        row["study_uid"] = row.get(study, "")
    return rows, columns


def _label(row: dict[str, str], path: Path, line: int) -> tuple[str, int]:
    study, lat, value = row["study_uid"], row["laterality"].upper(), row["label"].lower()
    if not study:
        raise InvalidInput(f"{path} line {line}: empty study_uid")
    if lat not in ("L", "R"):
        raise InvalidInput(f"{path} line {line}: laterality {row['laterality']!r} is not L or R")
    if value in POSITIVE:
        return lat, 1
    if value in NEGATIVE:
        return lat, 0
    raise InvalidInput(
        f"{path} line {line}: label {row['label']!r} is not malignant/benign/normal or 1/0"
    )


def _breast_labels(rows: list[dict[str, str]], path: Path) -> dict[tuple[str, str], int]:
    """(study, laterality) -> label; rows of the same breast must agree."""
    out: dict[tuple[str, str], int] = {}
    for line, row in enumerate(rows, start=2):
        lat, label = _label(row, path, line)
        key = (row["study_uid"], lat)
        if out.setdefault(key, label) != label:
            raise InvalidInput(
                f"{path} line {line}: study {key[0]} breast {lat} is labelled both malignant "
                "and not malignant"
            )
    return out


def _from_file_rows(
    rows: list[dict[str, str]], path: Path, data_dir: Path
) -> tuple[list[LabelledBreast], list[str]]:
    """Per-view rows naming their files (truth.csv)."""
    labels = _breast_labels(rows, path)
    views: dict[tuple[str, str], dict[str, Path]] = {}
    kinds: dict[tuple[str, str], str] = {}
    lesions: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = {}
    missing: list[str] = []
    for line, row in enumerate(rows, start=2):
        key = (row["study_uid"], row["laterality"].upper())
        view = row.get("view", "").upper()
        if view not in ("CC", "MLO"):
            raise InvalidInput(f"{path} line {line}: view {row.get('view')!r} is not CC or MLO")
        file = data_dir / row["file"]
        if not file.is_file():
            missing.append(str(file))
            continue
        if view in views.setdefault(key, {}):
            raise InvalidInput(
                f"{path} line {line}: a second {key[1]} {view} row for study {key[0]}"
            )
        views[key][view] = file
        kinds[key] = row.get("lesion_kind", "")
        lesion = _lesion(row)
        if lesion is not None:
            lesions.setdefault(key, {})[view] = lesion
    if missing:
        shown = ", ".join(missing[:_SHOW]) + (" ..." if len(missing) > _SHOW else "")
        raise InvalidInput(
            f"{path}: {len(missing)} labelled image file(s) not found under {data_dir}: {shown}"
        )
    breasts = [
        LabelledBreast(
            study, lat, labels[(study, lat)], v, kinds[(study, lat)], lesions.get((study, lat), {})
        )
        for (study, lat), v in sorted(views.items())
    ]
    return breasts, []


def _lesion(row: dict[str, str]) -> tuple[float, float, float] | None:
    try:
        x, y, r = (float(row[k]) for k in ("center_x", "center_y", "radius_px"))
    except (KeyError, ValueError):
        return None
    return x, y, r


# ---------------------------------------------------------------------- folder walk


def _from_folder(
    labels: dict[tuple[str, str], int], path: Path, data_dir: Path
) -> tuple[list[LabelledBreast], list[str]]:
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for file in _dicom_files(data_dir):
        ds = _header(file)
        source = str(file)
        key = (_study_uid(ds, source), _laterality(ds, source))
        view = _view(ds, source)
        other = found.setdefault(key, {}).get(view)
        if other is not None:
            raise InvalidInput(
                f"{other} and {file} are both the {key[1]} {view} view of study {key[0]}: "
                "keep one image per breast and view in the study folder"
            )
        found[key][view] = file
    absent = [k for k in sorted(labels) if k not in found]
    if absent:
        shown = ", ".join(f"study {s} breast {lat}" for s, lat in absent[:_SHOW])
        raise InvalidInput(
            f"{path}: {len(absent)} of {len(labels)} labelled breasts have no images in "
            f"{data_dir} ({shown}{' ...' if len(absent) > _SHOW else ''}): the labels do not "
            "match the studies"
        )
    unlabelled = [k for k in found if k not in labels]
    notes = []
    if unlabelled:
        notes.append(f"{len(unlabelled)} breast(s) in {data_dir} have no label and are left out")
    breasts = [
        LabelledBreast(s, lat, labels[(s, lat)], found[(s, lat)]) for s, lat in sorted(labels)
    ]
    return breasts, notes


def _dicom_files(folder: Path) -> list[Path]:
    """DICOM Part 10 files under ``folder`` (hidden files and folders skipped)."""
    files = []
    for path in sorted(folder.rglob("*")):
        if any(p.startswith(".") for p in path.relative_to(folder).parts) or not path.is_file():
            continue
        try:
            with path.open("rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    files.append(path)
        except OSError:
            continue
    if not files:
        raise InvalidInput(f"{folder}: no DICOM files found")
    return files


def _header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise NotDicom(f"{path}: unreadable DICOM header ({exc})") from None
