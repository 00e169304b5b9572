"""The dataset WADO-RS metadata describes, read without its Pixel Data value."""

from __future__ import annotations

from pydicom.dataset import Dataset

from services.core.dicom.validation import read_part10
from services.core.errors import CrgateError
from services.core.retrieve.errors import StoredMalformed
from services.core.retrieve.lookup import StoredInstance, check_file, servable

PIXEL_DATA = 0x7FE00010


def metadata_dataset(instance: StoredInstance) -> tuple[Dataset, str | None]:
    """The dataset without its Pixel Data value (never read), and Pixel Data's VR if present."""
    check_file(instance)
    try:
        ds = read_part10(instance.path)
    except CrgateError as exc:
        raise StoredMalformed(f"{instance.source} is stored but unreadable: {exc}") from None
    servable(ds, instance)
    pixel_vr = None
    raw = ds.get_item(PIXEL_DATA)
    if raw is not None:
        pixel_vr = str(raw.VR)
        del ds[PIXEL_DATA]
    ds.AvailableTransferSyntaxUID = instance.transfer_syntax_uid
    return ds, pixel_vr
