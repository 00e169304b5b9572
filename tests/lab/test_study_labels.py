"""The labelled set: phantom truth.csv, a per-breast labels CSV with a folder walk, and labels
that do not match the studies."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from services.core.errors import InvalidInput, NotFound
from services.lab.phantom import PhantomConfig, write_studies
from services.lab.safety.labels import load_labelled_set

TINY = PhantomConfig(width=128, height=160)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study-labels")
    write_studies(out, 3, seed=11, config=TINY)
    return out


def _per_breast_csv(
    truth: Path, out: Path, *, drop: int = 0, extra: list[str] | None = None
) -> Path:
    with truth.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    breasts = sorted({(r["study_uid"], r["laterality"], r["label"]) for r in rows})[drop:]
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_uid", "laterality", "label"])
        writer.writerows(breasts)
        if extra:
            writer.writerow(extra)
    return out


def test_phantom_truth(phantoms: Path) -> None:
    labelled = load_labelled_set(phantoms)
    assert labelled.labels_file == phantoms / "truth.csv"
    assert len(labelled.breasts) == 6
    assert labelled.n_studies == 3 and labelled.n_views == 12
    assert 0 < labelled.n_malignant < 6
    for breast in labelled.breasts:
        assert set(breast.views) == {"CC", "MLO"}
        assert all(p.is_file() for p in breast.views.values())
        assert breast.label == int(breast.kind in ("spiculated_mass", "calcification_cluster"))
        assert set(breast.lesions) == (set() if breast.kind == "none" else {"CC", "MLO"})
    assert labelled.fingerprint() == load_labelled_set(phantoms).fingerprint()


def test_per_breast_csv_and_folder_walk_give_the_same_set(phantoms: Path, tmp_path: Path) -> None:
    labels = _per_breast_csv(phantoms / "truth.csv", tmp_path / "labels.csv")
    walked = load_labelled_set(phantoms, labels)
    truth = load_labelled_set(phantoms)
    assert [(b.key, b.label, b.views) for b in walked.breasts] == [
        (b.key, b.label, b.views) for b in truth.breasts
    ]
    assert walked.notes == []


def test_unlabelled_breasts_are_left_out_with_a_note(phantoms: Path, tmp_path: Path) -> None:
    labels = _per_breast_csv(phantoms / "truth.csv", tmp_path / "labels.csv", drop=1)
    try:
        labelled = load_labelled_set(phantoms, labels)
    except InvalidInput as exc:  # dropping the first breast may leave one class only
        assert "both classes" in str(exc)
        return
    assert len(labelled.breasts) == 5
    assert labelled.notes and "no label" in labelled.notes[0]


def test_labels_that_do_not_match_the_studies(phantoms: Path, tmp_path: Path) -> None:
    labels = _per_breast_csv(
        phantoms / "truth.csv", tmp_path / "labels.csv", extra=["1.2.3.4.5", "L", "malignant"]
    )
    with pytest.raises(
        InvalidInput, match=r"1 of 7 labelled breasts have no images.*1\.2\.3\.4\.5"
    ):
        load_labelled_set(phantoms, labels)


def test_truth_rows_naming_missing_files(phantoms: Path, tmp_path: Path) -> None:
    copy = tmp_path / "set"
    shutil.copytree(phantoms, copy)
    victim = next(p for p in copy.rglob("LCC.dcm"))
    victim.unlink()
    with pytest.raises(InvalidInput, match=r"1 labelled image file.*not found.*LCC\.dcm"):
        load_labelled_set(copy)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("study_uid,side,label\n1.2,L,1\n", "lacks the column.*laterality"),
        ("study_uid,laterality,label\n1.2,X,1\n", "line 2: laterality 'X' is not L or R"),
        ("study_uid,laterality,label\n1.2,L,maybe\n", "line 2: label 'maybe'"),
        ("study_uid,laterality,label\n", "no rows"),
        ("study_uid,laterality,label\n1.2,L,1\n1.2,L,0\n", "both malignant and not"),
    ],
)
def test_bad_label_files(phantoms: Path, tmp_path: Path, text: str, message: str) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    with pytest.raises(InvalidInput, match=message):
        load_labelled_set(phantoms, labels)


def test_one_class_only(phantoms: Path, tmp_path: Path) -> None:
    labelled = load_labelled_set(phantoms)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "study_uid,laterality,label\n"
        + "".join(f"{b.study_uid},{b.laterality},normal\n" for b in labelled.breasts)
    )
    with pytest.raises(InvalidInput, match="all 6 breasts are benign or normal: AUROC needs both"):
        load_labelled_set(phantoms, labels)


def test_missing_folder_or_labels(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="data folder"):
        load_labelled_set(tmp_path / "absent")
    with pytest.raises(NotFound, match=r"no truth\.csv there: give --labels"):
        load_labelled_set(tmp_path)
