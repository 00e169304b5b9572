"""The dataset WADO-RS metadata describes, read without its Pixel Data value."""

from __future__ import annotations

import pydicom
from pydicom.dataset import Dataset

from services.core.errors import CodecError
from services.core.retrieve.lookup import StoredInstance, check_file

PIXEL_DATA = 0x7FE00010


def metadata_dataset(instance: StoredInstance) -> tuple[Dataset, str | None]:
    """The dataset without its Pixel Data value (never read), and Pixel Data's VR if present."""
    check_file(instance)
    try:
        ds = pydicom.dcmread(instance.path, defer_size=1024)
    except Exception as exc:
        raise CodecError(f"{instance.source}: stored file unreadable ({exc})") from None
    pixel_vr = None
    raw = ds.get_item(PIXEL_DATA)
    if raw is not None:
        pixel_vr = str(raw.VR)
        del ds[PIXEL_DATA]
    ds.AvailableTransferSyntaxUID = instance.transfer_syntax_uid
    return ds, pixel_vr
