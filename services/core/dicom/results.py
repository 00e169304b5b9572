"""The DICOM objects a classification job returns to the study it read.

* :func:`derived_series`: the JPEG 2000 / HTJ2K copies as one new derived series (MG, same study);
  :func:`derived_copies` does the same for any series a compress job transcodes;
* :func:`overlay_captures`: the saliency overlays (HiResCAM, Grad-CAM or occlusion) as
  Secondary Capture images (RGB, 8 bits), one series per breast;
* :func:`findings_report`: a Comprehensive SR with the model, the compression and, per breast
  and per image, what the compression did to the AI and to the pixels.

Every object gets UIDs of its own that are stable for the job: the Series Instance UID
(``series_uid(job_id, role)``) and the SOP Instance UID (``instance_uid(job_id, role, source)``,
``source`` the original's SOP Instance UID): a retried job stores the same objects again, not a
second set. Other jobs (another CR, a later instance) get other UIDs. The objects carry the
source study and patient modules, Manufacturer "crgate", Content Date/Time of the call and a
file meta header, so ``ds.save_as(path, enforce_file_format=True)`` works.

SR content tree (relationship, value type, concept)::

    CONTAINER  99CRGATE CRGATE-REPORT
      HAS CONCEPT MOD  CODE  DCM 121049 Language of Content Item and Descendants (TID 1204)
      HAS OBS CONTEXT  TID 1002/1004: device observer "crgate"
      CONTAINS  TEXT  DCM 121106 Comment = the "not for clinical use" notice
      CONTAINS  TEXT  99CRGATE JOB-ID, RESULT-ID
      CONTAINS  CONTAINER 99CRGATE COMPRESSION
        CONTAINS  NUM 99CRGATE CR-APPLIED, CR-REQUESTED (only when one was requested) {ratio}
        CONTAINS  TEXT 99CRGATE CR-POLICY
      CONTAINS  CONTAINER 99CRGATE BREAST            (one per breast)
        HAS CONCEPT MOD  CODE SCT 363698007 Finding Site = SCT 80248007 / 73056007 left/right
        HAS CONCEPT MOD  TEXT TID 4019: DCM 111001 name, 111003 version, 111002 "sha256=<hex>"
        CONTAINS  NUM  DCM 111047 Probability of cancer (on the compressed copy) {probability}
        CONTAINS  NUM  99CRGATE P-ORIGINAL, P-CHANGE, THRESHOLD {probability}
        CONTAINS  TEXT 99CRGATE SALIENCY-METHOD, FALLBACK (only when a view stood in for another)
        CONTAINS  IMAGE DCM 121112 Source of Measurement (each source view of the breast)
        CONTAINS  IMAGE 99CRGATE COMPRESSED-COPY (each view's copy the probability was measured on)
        CONTAINS  IMAGE 99CRGATE SALIENCY-OVERLAY (each view's overlay capture)
      CONTAINS  CONTAINER 99CRGATE IMAGE-QUALITY     (one per image)
        CONTAINS  IMAGE DCM 121112 Source of Measurement (the original)
        CONTAINS  NUM  99CRGATE CR-ACHIEVED {ratio}, PSNR dB, SSIM 1 (absent under 7x7 pixels),
                       MAX-ABS-ERROR 1, BYTES-IN By, BYTES-OUT By

Private codes (coding scheme designator 99CRGATE, declared in the Coding Scheme Identification
Sequence):

=================  ============================================================
code               meaning
=================  ============================================================
CRGATE-REPORT      crgate compression and classification report (document title)
JOB-ID             crgate job identifier
RESULT-ID          crgate result identifier
COMPRESSION        Compression applied (container)
CR-APPLIED         Applied compression ratio (the job's target CR)
CR-REQUESTED       Requested compression ratio (what the request asked for)
CR-POLICY          Compression policy source
BREAST             Breast classification (container)
P-ORIGINAL         Probability of cancer on the original images
P-CHANGE           Change in probability of cancer due to compression (at CR - original)
THRESHOLD          Decision threshold of the model
SALIENCY-METHOD    Saliency method of the overlays
FALLBACK           Classification fallback (a missing view replaced by the other)
IMAGE-QUALITY      Compressed image quality (container)
CR-ACHIEVED        Achieved compression ratio (uncompressed over codestream bytes)
PSNR               Peak signal-to-noise ratio (decoded copy against the original)
SSIM               Structural similarity index (mean SSIM)
MAX-ABS-ERROR      Maximum absolute pixel error (stored values)
BYTES-IN           Uncompressed pixel data size
BYTES-OUT          codestream size (JPEG 2000 or HTJ2K)
COMPRESSED-COPY    Compressed copy the probability was measured on
SALIENCY-OVERLAY   Saliency overlay
=================  ============================================================
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence as Sequence_
from datetime import datetime
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian

from services.core.codecs import OutputSyntax
from services.core.dicom.derive import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from services.core.dicom.uids import stable_uid
from services.core.errors import InvalidInput
from services.core.pipeline import BreastFinding, Classification, TranscodeResult

MANUFACTURER = "crgate"
SCHEME = "99CRGATE"
NOT_FOR_CLINICAL_USE = "Not for clinical use: synthetic-phantom model"

# PS3.16 CID 7202 Source Image Purposes of Reference
_UNCOMPRESSED_PREDECESSOR = ("121320", "DCM", "Uncompressed predecessor")
_LOSSY_COMPRESSED_PREDECESSOR = ("121330", "DCM", "Lossy compressed predecessor")
_PROCESSING_SOURCE = ("121322", "DCM", "Source image for image processing operation")

_BREAST_SITE = {"L": codes.SCT.LeftBreast, "R": codes.SCT.RightBreast}
_RATIO = CodedConcept("{ratio}", "UCUM", "ratio")
_PROBABILITY = CodedConcept("{probability}", "UCUM", "probability")
_NO_UNITS = CodedConcept("1", "UCUM", "no units")
_DECIBEL = CodedConcept("dB", "UCUM", "decibel")
_BYTE = CodedConcept("By", "UCUM", "byte")


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, SCHEME, meaning)


_CODES = {
    "report": _private("CRGATE-REPORT", "crgate compression and classification report"),
    "job": _private("JOB-ID", "crgate job identifier"),
    "result": _private("RESULT-ID", "crgate result identifier"),
    "compression": _private("COMPRESSION", "Compression applied"),
    "applied": _private("CR-APPLIED", "Applied compression ratio"),
    "requested": _private("CR-REQUESTED", "Requested compression ratio"),
    "policy": _private("CR-POLICY", "Compression policy source"),
    "breast": _private("BREAST", "Breast classification"),
    "p_original": _private("P-ORIGINAL", "Probability of cancer on the original images"),
    "p_change": _private("P-CHANGE", "Change in probability of cancer due to compression"),
    "threshold": _private("THRESHOLD", "Decision threshold of the model"),
    "saliency": _private("SALIENCY-METHOD", "Saliency method of the overlays"),
    "fallback": _private("FALLBACK", "Classification fallback"),
    "quality": _private("IMAGE-QUALITY", "Compressed image quality"),
    "achieved": _private("CR-ACHIEVED", "Achieved compression ratio"),
    "psnr": _private("PSNR", "Peak signal-to-noise ratio"),
    "ssim": _private("SSIM", "Structural similarity index"),
    "max_error": _private("MAX-ABS-ERROR", "Maximum absolute pixel error"),
    "bytes_in": _private("BYTES-IN", "Uncompressed pixel data size"),
    "bytes_out": _private("BYTES-OUT", "Codestream size"),
    "copy": _private("COMPRESSED-COPY", "Compressed copy the probability was measured on"),
    "overlay": _private("SALIENCY-OVERLAY", "Saliency overlay"),
}
_SIDE = {"L": "left breast", "R": "right breast"}

_PATIENT_STUDY_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_CONCEPT_MOD = hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD


def series_uid(job_id: str, role: str) -> str:
    """The Series Instance UID of one kind of result ("derived", "overlays", "report")."""
    return stable_uid("crgate", "job", job_id, role)


def instance_uid(job_id: str, role: str, source_uid: str = "") -> str:
    """The SOP Instance UID of one result object: of ``role`` ("derived", "overlays",
    "report"), made from original ``source_uid`` (none for the report), by job ``job_id``."""
    return stable_uid("crgate", "job", job_id, role, "instance", source_uid)


# ---------------------------------------------------------------------- derived images


def derived_series(
    classification: Classification, *, job_id: str, series_number: int = 9001
) -> list[Dataset]:
    """The compressed copies as one new series of the study, each a new instance.

    Each copy gets the job's UID for it (:func:`instance_uid`), lossy or lossless: not the
    random one derive.py gave a lossy copy, nor the original's that a lossless copy kept.
    """
    return derived_copies(
        classification.images, job_id=job_id, cr=classification.cr, series_number=series_number
    )


def derived_copies(
    images: list[TranscodeResult],
    *,
    job_id: str,
    cr: float,
    series_number: int = 9001,
    series_role: str = "derived",
) -> list[Dataset]:
    """Copies as one new series (``series_uid(job_id, series_role)``); a compress job makes
    one such series per source series, with a role per source series."""
    now = datetime.now()  # DICOM dates and times are local, as highdicom writes them
    uid = series_uid(job_id, series_role)
    lossless = all(r.lossless for r in images)
    titles = sorted({codec_title(r) for r in images}) or ["JPEG 2000"]
    title = " / ".join(titles)
    description = f"crgate {title} lossless" if lossless else f"crgate {title} CR {cr:g}"
    return [
        _derived(result, (uid, job_id), series_number, index, description, now)
        for index, result in enumerate(images, start=1)
    ]


def _derived(
    result: TranscodeResult,
    series: tuple[str, str],
    series_number: int,
    instance_number: int,
    description: str,
    now: datetime,
) -> Dataset:
    output = _output_of(result)
    ds = copy.deepcopy(output)
    uid, job_id = series
    source_uid = result.input_sop_instance_uid
    ds.SOPInstanceUID = instance_uid(job_id, "derived", source_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceCreationDate = _da(now)
    ds.InstanceCreationTime = _tm(now)
    ds.ContentDate, ds.ContentTime = _da(now), _tm(now)
    ds.SeriesInstanceUID = uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate, ds.SeriesTime = _da(now), _tm(now)
    ds.InstanceNumber = instance_number
    image_type = [str(v) for v in ds.get("ImageType", [])] or ["DERIVED", "SECONDARY"]
    image_type[0] = "DERIVED"
    ds.ImageType = image_type
    if result.lossless:
        earlier = str(ds.get("DerivationDescription", "")).strip()
        lossless_description = (
            f"{codec_title(result)} reversible (lossless) compression by crgate, pixels unchanged"
        )
        ds.DerivationDescription = "; ".join(filter(None, [earlier, lossless_description]))
    ds.SourceImageSequence = Sequence([_source_reference(ds, source_uid)])
    _credit_acquisition(ds)
    return ds


def codec_title(result: TranscodeResult) -> str:
    """What the copy's transfer syntax is called ("JPEG 2000", "HTJ2K")."""
    syntax = OutputSyntax.from_uid(result.output_syntax)
    return syntax.codec.title if syntax is not None else str(UID(result.output_syntax).name)


def _output_of(result: TranscodeResult) -> Dataset:
    if result.dataset is None:
        raise InvalidInput(
            f"image {result.input_sop_instance_uid} has no output dataset: build the results "
            "from the Classification that classify_datasets returned, not from its JSON"
        )
    return result.dataset


def _source_reference(ds: Dataset, source_uid: str) -> Dataset:
    """derive.py's reference to the original when it names it, else a new one.

    A lossless copy carries its original's own Source Image Sequence (which points one
    generation further back), so it is replaced.
    """
    for item in ds.get("SourceImageSequence", []):
        found: Dataset = item
        named = str(found.get("ReferencedSOPInstanceUID", "")) == source_uid
        if named and "PurposeOfReferenceCodeSequence" in found:
            return found
    reference = Dataset()
    reference.ReferencedSOPClassUID = ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = source_uid
    # only lossless copies get here: they keep their original's Lossy Image Compression
    was_lossy = str(ds.get("LossyImageCompression", "00")) == "01"
    purpose = _LOSSY_COMPRESSED_PREDECESSOR if was_lossy else _UNCOMPRESSED_PREDECESSOR
    reference.PurposeOfReferenceCodeSequence = Sequence([_code(*purpose)])
    return reference


def _credit_acquisition(ds: Dataset) -> None:
    """Manufacturer becomes crgate; the acquiring equipment moves to Contributing Equipment."""
    equipment = Dataset()
    equipment.PurposeOfReferenceCodeSequence = Sequence(
        [_code("109101", "DCM", "Acquisition Equipment")]
    )
    equipment.Manufacturer = ds.get("Manufacturer", "")
    for keyword in ("InstitutionName", "ManufacturerModelName", "DeviceSerialNumber"):
        if ds.get(keyword):
            setattr(equipment, keyword, ds.get(keyword))
    if ds.get("SoftwareVersions"):
        equipment.SoftwareVersions = ds.SoftwareVersions
    earlier = list(ds.get("ContributingEquipmentSequence", []))
    ds.ContributingEquipmentSequence = Sequence([*earlier, equipment])
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.SoftwareVersions = IMPLEMENTATION_VERSION


# ---------------------------------------------------------------------- overlays


def overlay_captures(
    classification: Classification,
    sources: dict[str, Dataset],
    overlays: dict[str, Image.Image],
    *,
    job_id: str,
    series_number: int = 9002,
) -> list[Dataset]:
    """Secondary Capture images of ``overlays``, one series per breast (Laterality filled in),
    each referencing its source image and the compressed copy it is drawn over.

    ``sources`` and ``overlays`` are keyed by the original SOP Instance UID (the keys of
    ``classification.saliency``); images without an overlay are skipped. The pixels are stored
    uncompressed (explicit VR little endian); the lossy history of the copy they show is kept.
    Left breasts get ``series_number``, right ones ``series_number + 2`` (the SR is between).
    """
    now = datetime.now()  # DICOM dates and times are local, as highdicom writes them
    stray = sorted(set(overlays) - {r.input_sop_instance_uid for r in classification.images})
    if stray:
        raise InvalidInput(f"overlays for images this classification did not read: {stray}")
    methods = {b.laterality: b.saliency_method for b in classification.breasts}
    captures: list[Dataset] = []
    for result in classification.images:
        overlay = overlays.get(result.input_sop_instance_uid)
        if overlay is None:
            continue
        source = _source(sources, result.input_sop_instance_uid)
        side = _laterality(source)
        method = methods.get(side, "unknown")
        number = series_number + (2 if side == "R" else 0)
        in_series = sum(1 for c in captures if c.SeriesNumber == number)
        captures.append(
            _capture(
                classification,
                result,
                source,
                overlay,
                method=method,
                series=(series_uid(job_id, f"overlays-{side}"), number, in_series + 1),
                sop_uid=instance_uid(job_id, "overlays", result.input_sop_instance_uid),
                now=now,
            )
        )
        capture = captures[-1]
        capture.Laterality = side
        capture.SeriesDescription = (
            f"crgate {method} overlays CR {classification.cr:g} {_SIDE.get(side, side)}"
        )[:64]
        copy = Dataset()  # the compressed copy the overlay is drawn over
        copy.ReferencedSOPClassUID = source.SOPClassUID
        copy.ReferencedSOPInstanceUID = instance_uid(
            job_id, "derived", result.input_sop_instance_uid
        )
        copy.PurposeOfReferenceCodeSequence = Sequence([_code(*_PROCESSING_SOURCE)])
        capture.SourceImageSequence.append(copy)
    return captures


def _capture(
    classification: Classification,
    result: TranscodeResult,
    source: Dataset,
    overlay: Image.Image,
    *,
    method: str,
    series: tuple[str, int, int],
    sop_uid: str,
    now: datetime,
) -> Dataset:
    uid, series_number, instance_number = series
    pixels = np.asarray(overlay.convert("RGB"), dtype=np.uint8)
    header = _header(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # replaced below by the source's own value, which highdicom's enum may not accept
        patient_orientation=("A", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"crgate {method} overlays CR {classification.cr:g}",
        manufacturer_model_name=MANUFACTURER,
        software_versions=IMPLEMENTATION_VERSION,
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
    )
    sc.copy_patient_and_study_information(header)
    if "PatientOrientation" in header:
        sc.PatientOrientation = header.PatientOrientation
    else:
        sc.PatientOrientation = []
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "NO"
    sc.DerivationDescription = (
        f"{method} saliency of model {classification.model} (sha256 "
        f"{classification.model_sha256[:16]}...) over the {codec_title(result)} copy at CR "
        f"{result.achieved_cr:.2f}, rendered by crgate"
    )[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = Sequence([_code(*_PROCESSING_SOURCE)])
    sc.SourceImageSequence = Sequence([reference])
    _copy_lossy_history(sc, _output_of(result))
    _file_meta(sc)
    return sc


def _copy_lossy_history(target: Dataset, shown: Dataset) -> None:
    """The overlay shows the decoded copy: once lossy, always lossy (PS3.3 C.7.6.1.1.5)."""
    if str(shown.get("LossyImageCompression", "")) == "01":
        target.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in shown:
                setattr(target, keyword, copy.deepcopy(shown[keyword].value))
    else:
        target.LossyImageCompression = "00"


# ---------------------------------------------------------------------- report


def findings_report(
    classification: Classification,
    sources: dict[str, Dataset],
    *,
    job_id: str,
    result_id: str,
    model_name: str,
    model_version: str,
    policy_source: str,
    requested_cr: float | None,
    series_number: int = 9003,
    notice: str = NOT_FOR_CLINICAL_USE,
    outputs: Sequence_[Dataset] = (),
) -> Dataset:
    """A Comprehensive SR of the job (content tree in the module docstring).

    ``sources`` (keyed by SOP Instance UID) must hold every image of ``classification``: they
    are the SR's evidence and give it its patient and study. ``outputs``, the job's compressed
    copies and overlay captures, are referenced from each breast (the copies the probability
    was measured on, the overlays of its views) and are evidence too.
    """
    now = datetime.now()  # DICOM dates and times are local, as highdicom writes them
    headers = {
        r.input_sop_instance_uid: _header(_source(sources, r.input_sop_instance_uid))
        for r in classification.images
    }
    for header in headers.values():  # highdicom reads these type 2 attributes unguarded
        for keyword in _PATIENT_STUDY_TYPE2:
            if keyword not in header:
                setattr(header, keyword, None)
    if not headers:
        raise InvalidInput("the classification has no images: nothing to report on")
    studies = {str(h.StudyInstanceUID) for h in headers.values()}
    if len(studies) != 1:
        raise InvalidInput(f"the images belong to {len(studies)} studies: {sorted(studies)}")

    root = hd.sr.ContainerContentItem(name=_CODES["report"])
    items: list[hd.sr.ContentItem] = [
        *hd.sr.LanguageOfContentItemAndDescendants(
            CodedConcept("en-US", "RFC5646", "English (United States)")
        ),
        *hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=stable_uid("crgate", "device"),
                name=MANUFACTURER,
                manufacturer_name=MANUFACTURER,
                model_name=MANUFACTURER,
            ),
        ),
        _text(codes.DCM.Comment, notice),
        _text(_CODES["job"], job_id),
        _text(_CODES["result"], result_id),
        _compression(classification.cr, requested_cr, policy_source),
    ]
    algorithm = (model_name, model_version, classification.model_sha256)
    made = {str(ds.SOPInstanceUID): _header(ds) for ds in outputs}
    for breast in classification.breasts:
        views = [h for h in headers.values() if _laterality(h) == breast.laterality]
        derived = [
            made[uid]
            for role, code in (("derived", "copy"), ("overlays", "overlay"))
            for view in views
            if (uid := instance_uid(job_id, role, str(view.SOPInstanceUID))) in made and code
        ]
        items.append(_breast(breast, algorithm, views, derived, job_id))
    for result in classification.images:
        items.append(_quality(result, headers[result.input_sop_instance_uid]))
    root.ContentSequence = hd.sr.ContentSequence(items)

    sr = hd.sr.ComprehensiveSR(
        evidence=[*headers.values(), *made.values()],
        content=root,
        series_instance_uid=series_uid(job_id, "report"),
        series_number=series_number,
        sop_instance_uid=instance_uid(job_id, "report"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"crgate findings CR {classification.cr:g}",
        manufacturer_model_name=MANUFACTURER,
        software_versions=IMPLEMENTATION_VERSION,
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=SCHEME,
                name="crgate private codes",
                responsible_organization=MANUFACTURER,
            )
        ],
    )
    _file_meta(sr)
    return sr


def _compression(
    cr: float, requested_cr: float | None, policy_source: str
) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=_CODES["compression"], relationship_type=_CONTAINS)
    items: list[hd.sr.ContentItem] = [_num(_CODES["applied"], cr, _RATIO)]
    if requested_cr is not None:
        items.append(_num(_CODES["requested"], requested_cr, _RATIO))
    items.append(_text(_CODES["policy"], policy_source))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _breast(
    breast: BreastFinding,
    algorithm: tuple[str, str, str],
    views: list[Dataset],
    outputs: list[Dataset],
    job_id: str,
) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=_CODES["breast"], relationship_type=_CONTAINS)
    site = _BREAST_SITE.get(breast.laterality)
    if site is None:
        raise InvalidInput(f"breast laterality {breast.laterality!r} is not L or R")
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=codes.SCT.FindingSite, value=site, relationship_type=_CONCEPT_MOD
        ),
        *hd.sr.AlgorithmIdentification(  # TID 4019
            name=algorithm[0], version=algorithm[1], parameters=[f"sha256={algorithm[2]}"]
        ),
        _num(codes.DCM.ProbabilityOfCancer, breast.probability, _PROBABILITY),
        _num(_CODES["p_original"], breast.probability_original, _PROBABILITY),
        _num(_CODES["p_change"], breast.change, _PROBABILITY),
        _num(_CODES["threshold"], breast.threshold, _PROBABILITY),
        _text(_CODES["saliency"], breast.saliency_method),
    ]
    if breast.fallback:
        items.append(_text(_CODES["fallback"], breast.fallback))
    items.extend(_image(view) for view in views)
    copies = {instance_uid(job_id, "derived", str(v.SOPInstanceUID)) for v in views}
    for output in outputs:
        concept = _CODES["copy"] if str(output.SOPInstanceUID) in copies else _CODES["overlay"]
        items.append(_image(output, concept))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _quality(result: TranscodeResult, source: Dataset) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=_CODES["quality"], relationship_type=_CONTAINS)
    items: list[hd.sr.ContentItem] = [
        _image(source),
        _num(_CODES["achieved"], result.achieved_cr, _RATIO),
    ]
    if math.isfinite(result.psnr_db):
        items.append(_num(_CODES["psnr"], result.psnr_db, _DECIBEL))
    if result.ssim is not None and math.isfinite(result.ssim):
        items.append(_num(_CODES["ssim"], result.ssim, _NO_UNITS))
    items.extend(
        [
            _num(_CODES["max_error"], result.max_abs_error, _NO_UNITS),
            _num(_CODES["bytes_in"], result.bytes_in, _BYTE),
            _num(_CODES["bytes_out"], result.bytes_out, _BYTE),
        ]
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _image(ds: Dataset, name: Any = None) -> hd.sr.ImageContentItem:
    return hd.sr.ImageContentItem(
        name=name or codes.DCM.SourceOfMeasurement,
        referenced_sop_class_uid=str(ds.SOPClassUID),
        referenced_sop_instance_uid=str(ds.SOPInstanceUID),
        relationship_type=_CONTAINS,
    )


def _num(name: Any, value: float, unit: CodedConcept) -> hd.sr.NumContentItem:
    number: float = int(value) if isinstance(value, int | np.integer) else float(value)
    return hd.sr.NumContentItem(name=name, value=number, unit=unit, relationship_type=_CONTAINS)


def _text(name: Any, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=_CONTAINS)


# ---------------------------------------------------------------------- shared


def _source(sources: dict[str, Dataset], uid: str) -> Dataset:
    ds = sources.get(uid)
    if ds is None:
        raise InvalidInput(f"no source dataset for image {uid}: pass every classified original")
    if str(ds.get("SOPInstanceUID", "")) != uid:
        raise InvalidInput(f"sources[{uid!r}] is instance {ds.get('SOPInstanceUID')!r}")
    return ds


def _header(ds: Dataset) -> Dataset:
    """A deep copy of ``ds`` without its pixel data (cheap, and nothing shared with it)."""
    header = Dataset()
    for element in ds:
        if element.tag != 0x7FE00010:
            header.add(copy.deepcopy(element))
    return header


def _laterality(ds: Dataset) -> str:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    try:
        shared = ds.SharedFunctionalGroupsSequence[0]
        return str(shared.FrameAnatomySequence[0].FrameLaterality).strip().upper()
    except (AttributeError, IndexError, KeyError):
        return ""


def _file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    ds.set_original_encoding(False, True)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _da(moment: datetime) -> str:
    return moment.strftime("%Y%m%d")


def _tm(moment: datetime) -> str:
    return moment.strftime("%H%M%S")
