"""The DICOM objects a classification job returns (services/core/dicom/results.py): the derived
JPEG 2000 series, the overlay Secondary Captures and the findings SR, each written to a file,
checked by dciodvfy and GDCM, and read back."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from services.core.dicom import results
from services.core.errors import InvalidInput
from services.core.inference.breasts import window_of
from services.core.inference.overlay import render_preview
from services.core.inference.runtime import get_classifier
from services.core.pipeline import Classification, classify_datasets
from services.lab.phantom import PhantomConfig, generate_study
from tests.dicomtools import dciodvfy_errors, dciodvfy_new_errors, gdcm_decode, require

CARD = Path(__file__).resolve().parents[2] / "models" / "cnn3-phantom-v2.json"
JOB = "0b5e5c62-7d1e-4d43-9d0e-1f6a3c9d2a10"
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge")


@pytest.fixture(scope="session")
def originals() -> list[tuple[str, Dataset]]:
    study = generate_study(0, seed=4242, config=PhantomConfig(width=416, height=512))
    return list(study.datasets.items())


@pytest.fixture(scope="session")
def sources(originals: list[tuple[str, Dataset]]) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for _, ds in originals}


@pytest.fixture(scope="session")
def classified(originals: list[tuple[str, Dataset]]) -> Classification:
    """One lossy classification for the whole session (about a second)."""
    return classify_datasets(originals, get_classifier(CARD), cr=25)


@pytest.fixture(scope="session")
def classified_lossless(originals: list[tuple[str, Dataset]]) -> Classification:
    return classify_datasets(originals, get_classifier(CARD), cr=1)


@pytest.fixture(scope="session")
def overlays(classified: Classification, sources: dict[str, Dataset]) -> dict[str, Image.Image]:
    """Preview overlays as the CLI makes them, keyed by the original SOP Instance UID."""
    made = {}
    for r in classified.images:
        ds = sources[r.input_sop_instance_uid]
        assert r.decoded is not None
        made[r.input_sop_instance_uid] = render_preview(
            r.decoded.reshape(r.decoded.shape[-2:]),
            classified.saliency[r.input_sop_instance_uid],
            bits_stored=int(ds.BitsStored),
            photometric=str(ds.PhotometricInterpretation),
            window=window_of(ds),
        )
    return made


def report(classification: Classification, sources: dict[str, Dataset], **kw: Any) -> Dataset:
    args: dict[str, Any] = {
        "job_id": JOB,
        "result_id": "result-7",
        "model_name": "cnn3-phantom",
        "model_version": "v1",
        "policy_source": "preset:uk-rcr-2023",
        "requested_cr": 20.0,
        **kw,
    }
    return results.findings_report(classification, sources, **args)


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_same_study_and_patient(ds: Dataset, source: Dataset) -> None:
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    for keyword in PATIENT_KEYWORDS:
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.Manufacturer == "crgate"
    assert ds.ContentDate and ds.ContentTime


# ---------------------------------------------------------------------- derived series


def test_derived_series_is_one_new_series_of_new_instances(
    classified: Classification, sources: dict[str, Dataset], tmp_path: Path
) -> None:
    derived = results.derived_series(classified, job_id=JOB)
    assert len(derived) == len(classified.images) == 4
    assert len({ds.SeriesInstanceUID for ds in derived}) == 1
    assert derived[0].SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources.values()}
    assert len({ds.SOPInstanceUID for ds in derived}) == 4
    assert not {ds.SOPInstanceUID for ds in derived} & set(sources)
    assert [int(ds.InstanceNumber) for ds in derived] == [1, 2, 3, 4]
    for ds, result in zip(derived, classified.images, strict=True):
        source = sources[result.input_sop_instance_uid]
        assert_same_study_and_patient(ds, source)
        assert ds.SeriesNumber == 9001
        assert ds.SeriesDescription == "crgate JPEG 2000 CR 25"
        assert ds.ImageType[0] == "DERIVED"
        assert ds.SOPInstanceUID == results.instance_uid(JOB, "derived", source.SOPInstanceUID)
        assert ds.SOPInstanceUID != result.output_sop_instance_uid  # not derive.py's random one
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == "ISO_15444_1"
        assert float(ds.LossyImageCompressionRatio) == pytest.approx(result.achieved_cr, abs=0.01)
        (reference,) = ds.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121320"
        assert ds.ContributingEquipmentSequence[-1].Manufacturer == source.Manufacturer

        back = pydicom.dcmread(write(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm"))
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"
        assert result.decoded is not None
        np.testing.assert_array_equal(
            back.pixel_array, result.decoded.reshape(back.pixel_array.shape)
        )


def test_derived_series_leaves_the_classification_alone(classified: Classification) -> None:
    before = [r.dataset.SeriesInstanceUID for r in classified.images if r.dataset is not None]
    results.derived_series(classified, job_id="another job")
    assert [r.dataset.SeriesInstanceUID for r in classified.images if r.dataset] == before


def test_lossless_copies_get_new_uids_and_a_source_reference(
    classified_lossless: Classification, sources: dict[str, Dataset], tmp_path: Path
) -> None:
    derived = results.derived_series(classified_lossless, job_id=JOB, series_number=42)
    for ds, result in zip(derived, classified_lossless.images, strict=True):
        assert result.lossless and result.output_sop_instance_uid == result.input_sop_instance_uid
        assert ds.SOPInstanceUID != result.input_sop_instance_uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SeriesNumber == 42 and ds.SeriesDescription == "crgate JPEG 2000 lossless"
        assert ds.ImageType[0] == "DERIVED" and ds.LossyImageCompression == "00"
        (reference,) = ds.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == result.input_sop_instance_uid
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121320"
        back = pydicom.dcmread(write(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm"))
        source = sources[result.input_sop_instance_uid]
        np.testing.assert_array_equal(back.pixel_array, source.pixel_array)


def test_series_uids_are_stable_per_job_and_differ_by_role(
    classified: Classification, sources: dict[str, Dataset], overlays: dict[str, Image.Image]
) -> None:
    first = results.derived_series(classified, job_id=JOB)[0].SeriesInstanceUID
    assert results.derived_series(classified, job_id=JOB)[0].SeriesInstanceUID == first
    assert results.derived_series(classified, job_id="other")[0].SeriesInstanceUID != first
    sc = results.overlay_captures(classified, sources, overlays, job_id=JOB)[0]
    sr = report(classified, sources)
    assert len({first, sc.SeriesInstanceUID, sr.SeriesInstanceUID}) == 3


def test_instance_uids_are_stable_per_job_and_differ_by_job_role_and_source(
    classified: Classification, sources: dict[str, Dataset], overlays: dict[str, Image.Image]
) -> None:
    """A retried job makes the same objects (no second set); another job makes its own."""

    def uids(job_id: str) -> list[str]:
        derived = results.derived_series(classified, job_id=job_id)
        captures = results.overlay_captures(classified, sources, overlays, job_id=job_id)
        sr = report(classified, sources, job_id=job_id)
        return [str(ds.SOPInstanceUID) for ds in [*derived, *captures, sr]]

    first = uids(JOB)
    assert uids(JOB) == first
    assert len(set(first)) == 9 and not set(first) & set(sources)
    assert not set(uids("another job")) & set(first)


@pytest.mark.tools
@pytest.mark.parametrize("which", ["classified", "classified_lossless"])
def test_derived_series_passes_dciodvfy_and_gdcm(
    which: str, request: pytest.FixtureRequest, sources: dict[str, Dataset], tmp_path: Path
) -> None:
    classified: Classification = request.getfixturevalue(which)
    for ds, result in zip(
        results.derived_series(classified, job_id=JOB), classified.images, strict=True
    ):
        source = write(sources[result.input_sop_instance_uid], tmp_path / "source.dcm")
        output = write(ds, tmp_path / "derived.dcm")
        assert dciodvfy_new_errors(source, output) == []
        assert result.decoded is not None
        pixels = gdcm_decode(output, tmp_path)
        np.testing.assert_array_equal(pixels, result.decoded.reshape(pixels.shape))


# ---------------------------------------------------------------------- overlays


def test_overlay_captures_are_rgb_secondary_captures_of_their_sources(
    classified: Classification,
    sources: dict[str, Dataset],
    overlays: dict[str, Image.Image],
    tmp_path: Path,
) -> None:
    captures = results.overlay_captures(classified, sources, overlays, job_id=JOB)
    assert len(captures) == 4
    assert len({sc.SeriesInstanceUID for sc in captures}) == 2  # one series per breast
    assert not {sc.SOPInstanceUID for sc in captures} & set(sources)
    copies = {ds.SOPInstanceUID for ds in results.derived_series(classified, job_id=JOB)}
    for sc, result in zip(captures, classified.images, strict=True):
        uid = result.input_sop_instance_uid
        source = sources[uid]
        assert_same_study_and_patient(sc, source)
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
        assert sc.BurnedInAnnotation == "NO" and sc.ConversionType == "WSD"
        assert sc.Laterality == source.ImageLaterality
        assert sc.SeriesNumber == (9002 if sc.Laterality == "L" else 9004)
        assert sc.SeriesDescription.endswith(
            "left breast" if sc.Laterality == "L" else "right breast"
        )
        assert "cnn3-phantom-v2" in sc.DerivationDescription
        assert "hirescam saliency" in sc.DerivationDescription
        assert sc.LossyImageCompression == "01"  # it shows the lossy copy
        reference, copy = sc.SourceImageSequence  # the original, and the copy it is drawn over
        assert reference.ReferencedSOPInstanceUID == uid
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert copy.ReferencedSOPInstanceUID in copies
        assert sc.PatientOrientation == source.PatientOrientation

        back = pydicom.dcmread(write(sc, tmp_path / "sc.dcm"))
        assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert back.PhotometricInterpretation == "RGB" and back.BitsAllocated == 8
        expected = np.asarray(overlays[uid].convert("RGB"))
        np.testing.assert_array_equal(back.pixel_array, expected)


def test_overlay_captures_skip_images_without_overlay(
    classified: Classification, sources: dict[str, Dataset], overlays: dict[str, Image.Image]
) -> None:
    some = dict(list(overlays.items())[:1])
    (sc,) = results.overlay_captures(classified, sources, some, job_id=JOB, series_number=7)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in some
    assert sc.SeriesNumber == 7 and sc.InstanceNumber == 1


def test_overlay_captures_refuse_unknown_images_and_missing_sources(
    classified: Classification, sources: dict[str, Dataset], overlays: dict[str, Image.Image]
) -> None:
    stray = {"1.2.3.4": next(iter(overlays.values()))}
    with pytest.raises(InvalidInput, match=r"1\.2\.3\.4"):
        results.overlay_captures(classified, sources, stray, job_id=JOB)
    missing = dict(list(sources.items())[1:])
    with pytest.raises(InvalidInput, match="no source dataset"):
        results.overlay_captures(classified, missing, overlays, job_id=JOB)


@pytest.mark.tools
def test_overlay_captures_pass_dciodvfy_and_gdcm(
    classified: Classification,
    sources: dict[str, Dataset],
    overlays: dict[str, Image.Image],
    tmp_path: Path,
) -> None:
    for sc in results.overlay_captures(classified, sources, overlays, job_id=JOB):
        path = write(sc, tmp_path / "sc.dcm")
        assert dciodvfy_errors(path) == []
        uid = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        expected = np.asarray(overlays[uid].convert("RGB"))
        np.testing.assert_array_equal(gdcm_decode(path, tmp_path), expected)


# ---------------------------------------------------------------------- findings report


def children(item: Any, value: str) -> list[Any]:
    """The content items directly under ``item`` whose concept name has code ``value``."""
    return [c for c in item.ContentSequence if c.name.value == value]


def one(item: Any, value: str) -> Any:
    (found,) = children(item, value)
    return found


def test_findings_report_reads_back_with_highdicom(
    classified: Classification, sources: dict[str, Dataset], tmp_path: Path
) -> None:
    sr = report(classified, sources)
    assert_same_study_and_patient(sr, next(iter(sources.values())))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert sr.SOPInstanceUID not in sources and sr.SeriesNumber == 9003
    parsed = hd.sr.srread(write(sr, tmp_path / "sr.dcm"))
    assert isinstance(parsed, hd.sr.ComprehensiveSR)
    root = parsed.content[0]
    assert (root.name.value, root.name.scheme_designator) == ("CRGATE-REPORT", "99CRGATE")

    assert "not for clinical use" in one(root, "121106").value.lower()
    assert "synthetic-phantom" in one(root, "121106").value
    assert one(root, "JOB-ID").value == JOB and one(root, "RESULT-ID").value == "result-7"
    compression = one(root, "COMPRESSION")
    assert one(compression, "CR-APPLIED").value == 25.0
    assert one(compression, "CR-REQUESTED").value == 20.0
    assert one(compression, "CR-POLICY").value == "preset:uk-rcr-2023"

    breasts = children(root, "BREAST")
    assert len(breasts) == len(classified.breasts) == 2
    sites = {"80248007": "L", "73056007": "R"}
    for item, finding in zip(breasts, classified.breasts, strict=True):
        site = one(item, "363698007")
        assert site.relationship_type == hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD
        assert site.value.scheme_designator == "SCT"
        assert sites[site.value.value] == finding.laterality
        assert one(item, "111001").value == "cnn3-phantom"
        assert one(item, "111003").value == "v1"
        assert one(item, "111002").value == f"sha256={classified.model_sha256}"
        assert one(item, "111047").value == finding.probability
        assert one(item, "P-ORIGINAL").value == finding.probability_original
        assert one(item, "P-CHANGE").value == finding.change
        assert one(item, "THRESHOLD").value == finding.threshold
        assert one(item, "111047").unit.value == "{probability}"
        views = {image.referenced_sop_instance_uid for image in children(item, "121112")}
        expected = {uid for uid, ds in sources.items() if ds.ImageLaterality == finding.laterality}
        assert views == expected and len(views) == 2

    qualities = children(root, "IMAGE-QUALITY")
    assert len(qualities) == len(classified.images)
    for item, result in zip(qualities, classified.images, strict=True):
        (image,) = children(item, "121112")
        assert image.referenced_sop_instance_uid == result.input_sop_instance_uid
        assert image.referenced_sop_class_uid == sources[result.input_sop_instance_uid].SOPClassUID
        assert one(item, "CR-ACHIEVED").value == result.achieved_cr
        assert one(item, "PSNR").value == result.psnr_db
        assert one(item, "PSNR").unit.value == "dB"
        assert one(item, "SSIM").value == result.ssim
        assert one(item, "MAX-ABS-ERROR").value == result.max_abs_error
        assert one(item, "BYTES-IN").value == result.bytes_in
        assert one(item, "BYTES-OUT").value == result.bytes_out
        assert one(item, "BYTES-OUT").unit.value == "By"

    evidence = {uid for _study, _series, uid, _class in parsed.get_evidence()}
    assert evidence == set(sources)
    schemes = [s.CodingSchemeDesignator for s in parsed.CodingSchemeIdentificationSequence]
    assert "99CRGATE" in schemes


def test_findings_report_without_a_requested_cr(
    classified: Classification, sources: dict[str, Dataset]
) -> None:
    sr = report(classified, sources, requested_cr=None, notice="research use only")
    root = hd.sr.ComprehensiveSR.from_dataset(sr).content[0]
    assert children(one(root, "COMPRESSION"), "CR-REQUESTED") == []
    assert one(root, "121106").value == "research use only"


def test_findings_report_needs_every_source(
    classified: Classification, sources: dict[str, Dataset]
) -> None:
    missing = dict(list(sources.items())[:3])
    with pytest.raises(InvalidInput, match="no source dataset"):
        report(classified, missing)


def test_objects_for_sources_with_sparse_patient_and_study_modules(
    classified: Classification, sources: dict[str, Dataset], overlays: dict[str, Image.Image]
) -> None:
    sparse = {}
    for uid, ds in sources.items():
        thin = copy.deepcopy(ds)
        for keyword in ("AccessionNumber", "PatientBirthDate", "StudyTime", "PatientOrientation"):
            del thin[keyword]
        sparse[uid] = thin
    sr = report(classified, sparse)
    assert sr.PatientID == next(iter(sources.values())).PatientID and not sr.AccessionNumber
    for sc in results.overlay_captures(classified, sparse, overlays, job_id=JOB):
        assert sc.PatientOrientation == []
    assert all("AccessionNumber" in ds for ds in sources.values())  # copies were changed


@pytest.mark.tools
def test_findings_report_passes_dciodvfy_gdcm_and_dcmtk(
    classified: Classification,
    sources: dict[str, Dataset],
    overlays: dict[str, Image.Image],
    tmp_path: Path,
) -> None:
    outputs = [
        *results.derived_series(classified, job_id=JOB),
        *results.overlay_captures(classified, sources, overlays, job_id=JOB),
    ]
    path = write(report(classified, sources, outputs=outputs), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    for tool, package in (("gdcmdump", "libgdcm-tools"), ("dsrdump", "dcmtk")):
        proc = subprocess.run(
            [require(tool, package), str(path)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"{tool}: {proc.stderr.strip()}"
        assert "rror" not in proc.stderr, f"{tool}: {proc.stderr.strip()}"


def test_findings_report_references_the_copies_and_overlays_of_each_breast(
    classified: Classification,
    sources: dict[str, Dataset],
    overlays: dict[str, Image.Image],
    tmp_path: Path,
) -> None:
    """What a viewer needs to go from a probability to the pixels it was measured on: per
    breast the compressed copies of its views and their overlays, all in the evidence."""
    derived = results.derived_series(classified, job_id=JOB)
    captures = results.overlay_captures(classified, sources, overlays, job_id=JOB)
    sr = report(classified, sources, outputs=[*derived, *captures])
    parsed = hd.sr.srread(write(sr, tmp_path / "sr.dcm"))
    root = parsed.content[0]
    side = {str(ds.SOPInstanceUID): ds.ImageLaterality for ds in sources.values()}
    copy_side = {
        str(ds.SOPInstanceUID): side[ds.SourceImageSequence[-1].ReferencedSOPInstanceUID]
        for ds in derived
    }
    overlay_side = {str(ds.SOPInstanceUID): ds.Laterality for ds in captures}
    for item, finding in zip(children(root, "BREAST"), classified.breasts, strict=True):
        copies = {i.referenced_sop_instance_uid for i in children(item, "COMPRESSED-COPY")}
        shown = {i.referenced_sop_instance_uid for i in children(item, "SALIENCY-OVERLAY")}
        assert copies == {u for u, s in copy_side.items() if s == finding.laterality}
        assert shown == {u for u, s in overlay_side.items() if s == finding.laterality}
        assert len(copies) == len(shown) == 2
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert evidence >= set(copy_side) | set(overlay_side) | set(sources)
