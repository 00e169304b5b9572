"""Building the output dataset (JPEG 2000 or HTJ2K) and its compression attributes (PS3.3
C.7.6.1.1.5).

Lossy output is a new instance: new SOP Instance UID, Image Type value 1 DERIVED, Lossy Image
Compression "01", the achieved ratio and the codec's method (``ISO_15444_1`` for JPEG 2000,
``ISO_15444_15`` for HTJ2K) appended to any earlier values,
a Derivation Description naming the ratio, and a Source Image Sequence pointing at the original.
Lossless output keeps its SOP Instance UID and never resets an earlier "01" to "00".
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import UID
from pydicom.valuerep import format_number_as_ds

from services.core.codecs import OutputSyntax
from services.core.codecs.image import EncodedImage
from services.core.dicom.uids import new_uid, stable_uid
from services.core.dicom.values import as_strings

IMPLEMENTATION_VERSION = "CRGATE_01"
IMPLEMENTATION_CLASS_UID = stable_uid("crgate", "implementation", 1)
#: Lossy Image Compression Method (PS3.3 C.7.6.1.1.5.1) of the lossy transfer syntaxes
SYNTAX_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000
    "1.2.840.10008.1.2.4.93": "ISO_15444_2",  # JPEG 2000 Part 2 multi-component
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K
}
# PS3.16 CID 7202 Source Image Purposes of Reference, CID 7203 Image Derivation
_UNCOMPRESSED_PREDECESSOR = ("121320", "DCM", "Uncompressed predecessor")
_LOSSY_COMPRESSED_PREDECESSOR = ("121330", "DCM", "Lossy compressed predecessor")
_LOSSY_COMPRESSION = ("113040", "DCM", "Lossy Compression")


def build_output(
    source: Dataset, encoded: EncodedImage, syntax: OutputSyntax, photometric: str
) -> Dataset:
    """A new dataset: ``source``'s attributes with ``encoded`` as encapsulated Pixel Data.

    ``photometric`` is that of the decoded values (MONOCHROME1/2 or RGB); three-sample output
    is declared YBR_ICT (irreversible) or YBR_RCT (reversible) as PS3.5 8.2.4 requires.
    """
    ds = Dataset()
    for element in source:  # shallow walk: skip the old pixel data without decoding it
        if element.tag != 0x7FE00010:
            ds.add(copy.deepcopy(element))
    was_lossy = str(source.get("LossyImageCompression", "00")) == "01"
    ratios, methods = earlier_compression(source, encoded.achieved_cr * encoded.compressed_bytes)

    if photometric == "RGB":
        ds.PhotometricInterpretation = "YBR_RCT" if syntax.lossless else "YBR_ICT"
        ds.PlanarConfiguration = 0
    else:
        ds.PhotometricInterpretation = photometric

    if syntax.lossless:
        if "LossyImageCompression" not in ds:
            ds.LossyImageCompression = "00"
        for keyword, values in (
            ("LossyImageCompressionRatio", ratios),
            ("LossyImageCompressionMethod", methods),
        ):
            if values:
                setattr(ds, keyword, values)
            elif keyword in ds:
                del ds[keyword]
    else:
        _mark_lossy(ds, source, encoded, syntax, was_lossy)
        ds.LossyImageCompressionRatio = [*ratios, _ratio(encoded)]
        ds.LossyImageCompressionMethod = [*methods, syntax.codec.method]

    ds.PixelData = encapsulate(encoded.frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta = _file_meta(source, ds, syntax)
    ds.set_original_encoding(False, True)  # written explicit VR little endian, whatever came in
    return ds


def _ratio(encoded: EncodedImage) -> str:
    return str(format_number_as_ds(round(encoded.achieved_cr, 2)))


def _mark_lossy(
    ds: Dataset, source: Dataset, encoded: EncodedImage, syntax: OutputSyntax, was_lossy: bool
) -> None:
    ratio = _ratio(encoded)
    now = datetime.now(UTC)
    ds.SOPInstanceUID = new_uid()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")

    image_type = list(source.get("ImageType", [])) or ["DERIVED", "SECONDARY"]
    image_type[0] = "DERIVED"
    ds.ImageType = image_type

    ds.LossyImageCompression = "01"
    for attr in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if attr in ds:  # no longer true of the lossy pixels
            del ds[attr]

    description = (
        f"{syntax.codec.title} irreversible ({syntax.codec.method}) lossy compression by crgate, "
        f"ratio {ratio}:1 (target {encoded.target_cr:g}:1)"
    )
    earlier = str(source.get("DerivationDescription", "")).strip()
    ds.DerivationDescription = f"{earlier}; {description}" if earlier else description
    derivation = Sequence(list(copy.deepcopy(source.get("DerivationCodeSequence", []))))
    derivation.append(_code(*_LOSSY_COMPRESSION))
    ds.DerivationCodeSequence = derivation

    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = _LOSSY_COMPRESSED_PREDECESSOR if was_lossy else _UNCOMPRESSED_PREDECESSOR
    reference.PurposeOfReferenceCodeSequence = Sequence([_code(*purpose)])
    ds.SourceImageSequence = Sequence([reference])


def earlier_compression(source: Dataset, uncompressed_bytes: float) -> tuple[list[str], list[str]]:
    """The input's earlier lossy compressions as (ratios, methods) of the same length, as PS3.3
    C.7.6.1.1.5 requires of the output (inputs often carry one without the other).

    A ratio without its method takes the method of the input's transfer syntax; a method
    without its ratio takes the ratio of the input's stored pixel data (uncompressed bytes over
    stored bytes) when its transfer syntax is that method. What cannot be completed so is left
    out, pairs kept in order.
    """
    ratios = as_strings(source.get("LossyImageCompressionRatio"))
    methods = as_strings(source.get("LossyImageCompressionMethod"))
    syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", ""))
    method = SYNTAX_METHODS.get(syntax)
    if len(ratios) == len(methods) + 1 and method is not None:
        methods.append(method)
    elif len(methods) == len(ratios) + 1 and method is not None and methods[-1] == method:
        stored = len(source.PixelData) if "PixelData" in source else 0
        if stored:
            ratios.append(format_number_as_ds(round(uncompressed_bytes / stored, 2)))
    kept = min(len(ratios), len(methods))
    return ratios[:kept], methods[:kept]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _file_meta(source: Dataset, ds: Dataset, syntax: OutputSyntax) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax.uid
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    old = getattr(source, "file_meta", None)
    if old is not None and "SourceApplicationEntityTitle" in old:
        meta.SourceApplicationEntityTitle = old.SourceApplicationEntityTitle
    return meta
