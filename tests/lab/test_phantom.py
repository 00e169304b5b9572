"""Tests of the synthetic mammography phantoms (services/lab/phantom.py)."""

from __future__ import annotations

import csv
import subprocess
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from services.core.dicom.io import write_dataset
from services.core.dicom.uids import validate_uid
from services.core.errors import InvalidParameter
from services.lab import phantom
from services.lab.phantom import (
    MG_FOR_PRESENTATION,
    VIEWS,
    PhantomConfig,
    PhantomStudy,
    TruthRow,
    generate_study,
    parse_size,
    write_studies,
)
from tests.dicomtools import require

SMALL = PhantomConfig(width=256, height=320)
MEDIUM = PhantomConfig(width=512, height=640)
KIND_LABEL = {
    "none": "normal",
    "round_mass": "benign",
    "spiculated_mass": "malignant",
    "calcification_cluster": "malignant",
}


def pixels(study: PhantomStudy, view: str) -> npt.NDArray[np.float64]:
    return np.asarray(study.datasets[view].pixel_array, dtype=np.float64)


def breast_mask(img: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Breast tissue: well above the air background (max is 4095 at 12 bits)."""
    return img > 0.15 * 4095


@pytest.fixture(scope="module")
def studies() -> list[PhantomStudy]:
    """Eight small studies; together they hold every lesion kind."""
    out = [generate_study(i, seed=11, config=SMALL) for i in range(8)]
    kinds = {row.lesion_kind for s in out for row in s.truth}
    assert kinds == set(KIND_LABEL), kinds
    return out


# --------------------------------------------------------------------------- determinism


def test_same_seed_is_identical() -> None:
    a = generate_study(3, seed=5, config=SMALL)
    b = generate_study(3, seed=5, config=SMALL)
    assert a.study_uid == b.study_uid
    assert a.truth == b.truth
    for view in VIEWS:
        da, db = a.datasets[view], b.datasets[view]
        assert da.PixelData == db.PixelData
        assert da.SOPInstanceUID == db.SOPInstanceUID
        assert da.SeriesInstanceUID == db.SeriesInstanceUID


def test_different_seed_or_index_differs() -> None:
    a = generate_study(3, seed=5, config=SMALL)
    b = generate_study(3, seed=6, config=SMALL)
    c = generate_study(4, seed=5, config=SMALL)
    for other in (b, c):
        assert other.study_uid != a.study_uid
        assert other.datasets["LCC"].PatientID != a.datasets["LCC"].PatientID
        for view in VIEWS:
            assert other.datasets[view].PixelData != a.datasets[view].PixelData
            assert other.datasets[view].SOPInstanceUID != a.datasets[view].SOPInstanceUID


def test_thread_count_does_not_change_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(phantom, "_workers", lambda: 1)
    one = generate_study(2, seed=9, config=SMALL)
    monkeypatch.setattr(phantom, "_workers", lambda: 4)
    four = generate_study(2, seed=9, config=SMALL)
    for view in VIEWS:
        assert one.datasets[view].PixelData == four.datasets[view].PixelData


def test_uids_are_valid_and_distinct(studies: list[PhantomStudy]) -> None:
    seen: set[str] = set()
    for study in studies:
        validate_uid(study.study_uid)
        for view in VIEWS:
            ds = study.datasets[view]
            for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID):
                validate_uid(str(uid))
            seen.add(str(ds.SOPInstanceUID))
    assert len(seen) == 4 * len(studies)


# --------------------------------------------------------------------------- DICOM


def test_dataset_attributes(studies: list[PhantomStudy]) -> None:
    study = studies[0]
    for view in VIEWS:
        ds = study.datasets[view]
        assert ds.SOPClassUID == MG_FOR_PRESENTATION
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.Modality == "MG"
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        assert ds.PixelRepresentation == 0
        assert ds.ImageLaterality == view[0]
        assert ds.ViewPosition == view[1:]
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.PatientSex == "F"
        assert ds.PatientID == "PH001100000"
        assert str(ds.PatientName).startswith("PHANTOM^")
        assert ds.ViewCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert ds.AnatomicRegionSequence[0].CodeValue == "76752008"
        assert (ds.Rows, ds.Columns) == (320, 256)
    codes = {v: study.datasets[v].ViewCodeSequence[0].CodeValue for v in VIEWS}
    assert codes == {
        "LCC": "399162004",
        "RCC": "399162004",
        "LMLO": "399368009",
        "RMLO": "399368009",
    }


def test_written_file_reads_back(tmp_path: Path, studies: list[PhantomStudy]) -> None:
    for view in VIEWS:
        path = tmp_path / f"{view}.dcm"
        write_dataset(studies[1].datasets[view], path)
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
        assert arr.shape == (320, 256)
        assert arr.dtype == np.uint16
        assert int(arr.max()) < 4096
        assert int(arr.max()) > 1000  # a breast is there
        assert ds.SOPInstanceUID == studies[1].datasets[view].SOPInstanceUID


@pytest.mark.tools
def test_dciodvfy_reports_no_errors(tmp_path: Path, studies: list[PhantomStudy]) -> None:
    for view in VIEWS:
        path = tmp_path / f"{view}.dcm"
        write_dataset(studies[0].datasets[view], path)
        proc = subprocess.run(
            [require("dciodvfy", "dicom3tools"), str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = proc.stdout + proc.stderr
        assert "MammographyImageForPresentation" in output
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert errors == [], f"{view}: {errors}"


def test_other_bits_stored() -> None:
    cfg = PhantomConfig(width=128, height=160, bits_stored=14)
    ds = generate_study(0, config=cfg).datasets["LCC"]
    assert (ds.BitsStored, ds.HighBit) == (14, 13)
    assert 4095 < int(ds.pixel_array.max()) < 2**14


# --------------------------------------------------------------------------- image content


def test_laterality_and_chest_wall(studies: list[PhantomStudy]) -> None:
    for study in studies:
        for view in VIEWS:
            img = pixels(study, view)
            mask = breast_mask(img)
            w = img.shape[1]
            left, right = mask[:, : w // 2].mean(), mask[:, w // 2 :].mean()
            # The chest wall column is tissue over the middle rows.
            mid = slice(img.shape[0] * 2 // 5, img.shape[0] * 3 // 5)
            if view[0] == "L":
                assert left > right + 0.2, view
                assert mask[mid, 0].all() and not mask[:, -1].any(), view
            else:
                assert right > left + 0.2, view
                assert mask[mid, -1].all() and not mask[:, 0].any(), view


def test_background_dark_breast_bright(studies: list[PhantomStudy]) -> None:
    img = pixels(studies[0], "LCC")
    assert img[:, -10:].mean() < 100  # air, far from the left-sided breast
    assert img[img.shape[0] // 2, 5 : img.shape[1] // 3].mean() > 1200


def test_mlo_has_brighter_pectoral_corner(studies: list[PhantomStudy]) -> None:
    for study in studies:
        for lat in "LR":
            cc, mlo = pixels(study, f"{lat}CC"), pixels(study, f"{lat}MLO")
            h, w = mlo.shape
            cols = slice(0, w // 12) if lat == "L" else slice(w - w // 12, w)
            corner = mlo[: h // 10, cols]
            assert breast_mask(corner).all()  # tissue reaches the top corner in MLO
            assert corner.mean() > 0.6 * 4095 * 0.95
            assert not breast_mask(cc[:1, cols]).any()  # CC breasts stop short of the top


def test_texture_has_power_law_spectrum() -> None:
    cfg = PhantomConfig(width=512, height=640, noise_level=0.0)
    slopes = []
    for i in range(3):
        study = generate_study(i, seed=3, config=cfg, malignant_fraction=0, benign_fraction=0)
        for view in ("LCC", "RCC"):
            img = pixels(study, view)
            x0 = 100 if view[0] == "L" else 512 - 100 - 128
            patch = img[256:384, x0 : x0 + 128]
            patch = (patch - patch.mean()) * np.outer(np.hanning(128), np.hanning(128))
            power = np.abs(np.fft.fft2(patch)) ** 2
            freq = np.hypot(*np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128)))
            sel = (freq > 0.02) & (freq < 0.2)
            slopes.append(np.polyfit(np.log(freq[sel]), np.log(power[sel]), 1)[0])
    assert -3.6 < float(np.median(slopes)) < -2.4, slopes


def test_noise_grows_with_signal() -> None:
    cfg = PhantomConfig(width=256, height=320, noise_level=0.05, texture_contrast=0.0)
    quiet = PhantomConfig(width=256, height=320, noise_level=0.0, texture_contrast=0.0)
    noisy = pixels(generate_study(0, config=cfg, malignant_fraction=0, benign_fraction=0), "LCC")
    clean = pixels(generate_study(0, config=quiet, malignant_fraction=0, benign_fraction=0), "LCC")
    diff = noisy - clean
    air = diff[:, -20:]
    tissue = diff[150:170, 20:60]
    assert tissue.std() > 2 * air.std() > 0


# --------------------------------------------------------------------------- truth


def _ring_stats(
    img: npt.NDArray[np.float64], row: TruthRow
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    assert row.center_x is not None and row.center_y is not None and row.radius_px
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    r = np.hypot(xx - row.center_x, yy - row.center_y)
    inside = img[r <= row.radius_px]
    ring_sel = (r >= 1.5 * row.radius_px) & (r <= 2.5 * row.radius_px) & breast_mask(img)
    return inside, img[ring_sel]


def test_truth_rows_and_labels(studies: list[PhantomStudy]) -> None:
    for study in studies:
        assert [f"{t.laterality}{t.view}" for t in study.truth] == list(VIEWS)
        for t in study.truth:
            assert t.study_uid == study.study_uid
            assert t.file == f"{study.study_uid}/{t.laterality}{t.view}.dcm"
            assert t.sop_instance_uid == study.datasets[t.laterality + t.view].SOPInstanceUID
            assert t.label == KIND_LABEL[t.lesion_kind]
            if t.lesion_kind == "none":
                assert (t.center_x, t.center_y, t.radius_px) == (None, None, None)
            else:
                assert t.center_x is not None and t.radius_px is not None
        by_lat = {lat: [t for t in study.truth if t.laterality == lat] for lat in "LR"}
        for rows in by_lat.values():  # one label and lesion per breast
            assert rows[0].label == rows[1].label
            assert rows[0].lesion_kind == rows[1].lesion_kind
            assert rows[0].radius_px == rows[1].radius_px


def test_lesions_inside_breast_and_brighter(studies: list[PhantomStudy]) -> None:
    checked = Counter[str]()
    for study in studies:
        for t in study.truth:
            if t.lesion_kind == "none":
                continue
            assert t.center_x is not None and t.center_y is not None
            img = pixels(study, t.laterality + t.view)
            mask = breast_mask(img)
            assert mask[round(t.center_y), round(t.center_x)], t
            inside, ring = _ring_stats(img, t)
            if t.lesion_kind == "calcification_cluster":
                # Calcifications are sparse bright specks: compare the brightest pixels.
                assert inside.max() > np.percentile(ring, 99.5), t
            else:
                assert inside.mean() > ring.mean() + 50, t
            checked[t.lesion_kind] += 1
    assert set(checked) == set(KIND_LABEL) - {"none"}


def test_calcification_mean_is_brighter_with_strong_calcs() -> None:
    cfg = PhantomConfig(
        width=512, height=640, calc_contrast=0.6, calc_count=(20, 30), calc_size_mm=(0.8, 1.2)
    )
    seen = 0
    for i in range(4):
        study = generate_study(i, seed=4, config=cfg, malignant_fraction=1.0, benign_fraction=0)
        for t in study.truth:
            if t.lesion_kind == "calcification_cluster":
                inside, ring = _ring_stats(pixels(study, t.laterality + t.view), t)
                assert inside.mean() > ring.mean(), t
                seen += 1
    assert seen >= 2


def _from_wall(x: float, lat: str) -> float:
    """Distance of column ``x`` from the chest wall of a ``lat`` breast."""
    return x if lat == "L" else SMALL.width - 1 - x


def test_lesion_positions_consistent_across_views(studies: list[PhantomStudy]) -> None:
    for study in studies:
        for lat in "LR":
            cc, mlo = (t for t in study.truth if t.laterality == lat)
            if cc.center_x is None or mlo.center_x is None:
                continue
            # Same depth from the chest wall (MLO breasts are up to 10 % deeper).
            d_cc, d_mlo = _from_wall(cc.center_x, lat), _from_wall(mlo.center_x, lat)
            assert 0.95 * d_cc <= d_mlo <= 1.15 * d_cc + 1, (d_cc, d_mlo)


def test_lesion_sizes_follow_config() -> None:
    cfg = PhantomConfig(width=512, height=640, mass_radius_mm=(5.0, 5.0))
    spacing = cfg.spacing_mm
    for i in range(4):
        for t in generate_study(i, config=cfg).truth:
            if t.lesion_kind in ("round_mass", "spiculated_mass"):
                assert t.radius_px == pytest.approx(5.0 / spacing, abs=0.01)


# --------------------------------------------------------------------------- write_studies


def test_write_studies(tmp_path: Path) -> None:
    cfg = PhantomConfig(width=128, height=160)
    calls: list[int] = []
    rows = write_studies(tmp_path / "out", 20, seed=1, config=cfg, on_study=calls.append)
    assert calls == list(range(20))
    assert len(rows) == 80
    with (tmp_path / "out" / "truth.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == tuple(f.name for f in fields(TruthRow))
        table = list(reader)
    assert len(table) == 80
    for row, rec in zip(rows, table, strict=True):
        assert rec["sop_instance_uid"] == row.sop_instance_uid
        assert rec["center_x"] == ("" if row.center_x is None else str(row.center_x))
        path = tmp_path / "out" / rec["file"]
        assert path.is_file()
    per_study = Counter(r.study_uid for r in rows)
    assert len(per_study) == 20 and set(per_study.values()) == {4}
    assert not list((tmp_path / "out").rglob("*.tmp"))
    ds = pydicom.dcmread(tmp_path / "out" / rows[0].file)
    assert ds.pixel_array.shape == (160, 128)

    # Study i of a run is generate_study(i): same UIDs, same truth.
    single = generate_study(7, seed=1, config=cfg)
    assert single.truth == rows[28:32]

    # Per-breast labels roughly follow the fractions (0.5 / 0.25 / 0.25 of 40 breasts).
    breasts = Counter(r.label for r in rows if r.view == "CC")
    assert sum(breasts.values()) == 40
    assert 12 <= breasts["malignant"] <= 28, breasts
    assert 3 <= breasts["benign"] <= 17, breasts
    assert 3 <= breasts["normal"] <= 17, breasts
    kinds = Counter(r.lesion_kind for r in rows if r.view == "CC")
    assert kinds["spiculated_mass"] + kinds["calcification_cluster"] == breasts["malignant"]


def test_write_studies_is_reproducible(tmp_path: Path) -> None:
    cfg = PhantomConfig(width=96, height=128)
    a = write_studies(tmp_path / "a", 3, seed=2, config=cfg)
    b = write_studies(tmp_path / "b", 3, seed=2, config=cfg)
    assert a == b
    for row in a:
        assert (tmp_path / "a" / row.file).read_bytes() == (tmp_path / "b" / row.file).read_bytes()
    assert (tmp_path / "a" / "truth.csv").read_bytes() == (
        tmp_path / "b" / "truth.csv"
    ).read_bytes()


def test_label_fractions_extremes() -> None:
    cfg = PhantomConfig(width=64, height=64)
    for frac, label in ((1.0, "malignant"), (0.0, "normal")):
        for i in range(3):
            study = generate_study(i, config=cfg, malignant_fraction=frac, benign_fraction=0.0)
            assert {t.label for t in study.truth} == {label}
    study = generate_study(0, config=cfg, malignant_fraction=0.0, benign_fraction=1.0)
    assert {t.lesion_kind for t in study.truth} == {"round_mass"}


# --------------------------------------------------------------------------- arguments


def test_parse_size() -> None:
    assert parse_size("512x640") == (512, 640)
    assert parse_size(" 3328X4096 ") == (3328, 4096)
    for bad in ("512", "512x", "ax640", "512x640x3", "-5x64", "10x10", "64x100000", "64x512"):
        with pytest.raises(InvalidParameter, match="size"):
            parse_size(bad)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"width": 10}, "width"),
        ({"height": 9000}, "height"),
        ({"width": 64, "height": 1024}, "aspect"),
        ({"width": 512.0}, "width"),
        ({"bits_stored": 8}, "bits_stored"),
        ({"pixel_spacing_mm": -1.0}, "pixel_spacing_mm"),
        ({"mass_radius_mm": (8.0, 4.0)}, "mass_radius_mm"),
        ({"mass_contrast": 1.5}, "mass_contrast"),
        ({"calc_count": (0, 5)}, "calc_count"),
        ({"noise_level": float("nan")}, "noise_level"),
        ({"texture_beta": 0.0}, "texture_beta"),
        ({"width": 256, "height": 320, "pixel_spacing_mm": 0.07}, "mass_radius_mm"),
    ],
)
def test_bad_config(kwargs: dict[str, object], word: str) -> None:
    with pytest.raises(InvalidParameter, match=word):
        PhantomConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"malignant_fraction": -0.1}, "malignant_fraction"),
        ({"malignant_fraction": 1.5}, "malignant_fraction"),
        ({"benign_fraction": 2.0}, "benign_fraction"),
        ({"malignant_fraction": 0.8, "benign_fraction": 0.3}, "malignant_fraction"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_generate_arguments(kwargs: dict[str, object], word: str) -> None:
    with pytest.raises(InvalidParameter, match=word):
        generate_study(0, config=PhantomConfig(width=64, height=64), **kwargs)  # type: ignore[arg-type]


def test_bad_index_and_count(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameter, match="index"):
        generate_study(-1, config=SMALL)
    for n in (0, -3):
        with pytest.raises(InvalidParameter, match="n_studies"):
            write_studies(tmp_path, n, config=SMALL)
    with pytest.raises(InvalidParameter, match="benign_fraction"):
        write_studies(tmp_path, 1, config=SMALL, benign_fraction=-1.0)
    assert not list(tmp_path.iterdir())  # nothing written on bad arguments


# --------------------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_size_default_study(tmp_path: Path) -> None:
    study = generate_study(0)
    cfg = PhantomConfig()
    assert cfg.spacing_mm == pytest.approx(0.07)
    for view in VIEWS:
        ds = study.datasets[view]
        assert (ds.Rows, ds.Columns) == (4096, 3328)
        assert [float(v) for v in ds.ImagerPixelSpacing] == [0.07, 0.07]
    path = tmp_path / "LMLO.dcm"
    write_dataset(study.datasets["LMLO"], path)
    arr = pydicom.dcmread(path).pixel_array
    assert arr.shape == (4096, 3328) and arr.dtype == np.uint16
    assert 2000 < int(arr.max()) < 4096
    for t in study.truth:
        if t.center_x is not None and t.center_y is not None:
            img = pixels(study, t.laterality + t.view)
            assert breast_mask(img)[round(t.center_y), round(t.center_x)]
