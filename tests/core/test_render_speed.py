"""What makes the console's panes quick changes no byte: the lookup-table windowing gives the
direct transform's bytes, and the frame cache gives the decoder's pixels, once per file version,
within its budget."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from services.core.dicom.uids import new_uid
from services.core.retrieve import windowing
from services.core.retrieve.framecache import FrameCache
from services.core.retrieve.frames import decode
from services.core.retrieve.lookup import StoredInstance, read_instance
from services.core.retrieve.windowing import Window


def direct(ds: Dataset, stored: np.ndarray, window: Window | None, invert: bool) -> np.ndarray:
    """The transform pixel by pixel, as render did it before the lookup table."""
    unit = windowing.grey_to_unit(ds, stored, window)
    if invert:
        unit = 1.0 - unit
    return np.round(unit * 255).astype(np.uint8)


def grey(**attributes: object) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    for name, value in attributes.items():
        setattr(ds, name, value)
    return ds


def voi_lut_item() -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [int(v) for v in (np.sqrt(np.arange(4096) / 4095) * 65535)]
    return item


CASES = {
    "uint16 min-max": (np.uint16, 0, 4095, {}, None),
    "uint16 rescaled, stored window": (
        np.uint16, 0, 4095,
        {"RescaleSlope": 0.5, "RescaleIntercept": -1024, "WindowCenter": 0, "WindowWidth": 900},
        None,
    ),
    "int16 CT, asked window": (
        np.int16, -2000, 3000, {"RescaleSlope": 1, "RescaleIntercept": 0}, Window(40, 400)
    ),
    "int16 sigmoid": (np.int16, -500, 500, {}, Window(10, 300, "sigmoid")),
    "uint16 linear-exact": (np.uint16, 100, 60000, {}, Window(30000, 20000, "linear-exact")),
    "uint16 VOI LUT": (np.uint16, 0, 4095, {"VOILUTSequence": Sequence([voi_lut_item()])}, None),
    "uint8": (np.uint8, 3, 250, {}, None),
    "constant": (np.uint16, 7, 7, {}, None),
}  # fmt: skip


@pytest.mark.parametrize("invert", [False, True], ids=["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("case", list(CASES))
def test_lookup_table_windowing_gives_the_direct_bytes(case: str, invert: bool) -> None:
    dtype, low, high, attributes, window = CASES[case]
    rng = np.random.default_rng(7)
    stored = rng.integers(low, high + 1, size=(300, 260)).astype(dtype)  # above LUT_MIN_PIXELS
    assert stored.size >= windowing.LUT_MIN_PIXELS
    ds = grey(**attributes)
    fast = windowing.grey_to_bytes(ds, stored, window, invert=invert)
    assert fast.dtype == np.uint8 and fast.shape == stored.shape
    assert np.array_equal(fast, direct(ds, stored, window, invert))
    if high > low + 100:
        assert fast.max() > fast.min()  # not a blank image that would match anything


def test_min_max_comes_from_the_values_present_not_their_range() -> None:
    # a Modality LUT that is not monotonic: the extremes are where the image's values map, so a
    # table over every value between min and max would stretch the image differently
    ds = grey()
    item = Dataset()
    item.LUTDescriptor = [8, 0, 16]
    item.LUTData = [0, 9000, 100, 200, 300, 400, 500, 600]
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    ds.BitsStored = 16
    ds.PixelRepresentation = 0
    stored = np.where(np.arange(300 * 260).reshape(300, 260) % 2, 0, 7).astype(np.uint16)
    assert np.array_equal(
        windowing.grey_to_bytes(ds, stored, None), direct(ds, stored, None, False)
    )
    assert set(np.unique(windowing.grey_to_bytes(ds, stored, None))) == {0, 255}


def write_image(path: Path, pixels: np.ndarray) -> StoredInstance:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = uid = new_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", uid
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return StoredInstance("", "", uid, "", path, 1, True)


def test_frame_cache_decodes_once_per_file_version_within_its_budget(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = [write_image(tmp_path / f"{i}.dcm", rng.integers(0, 4096, (64, 80))) for i in range(3)]
    one_frame = 64 * 80 * 2
    cache = FrameCache(max_bytes=2 * one_frame)  # two frames fit, not three
    first = cache.frame(images[0], read_instance(images[0]), 0)
    assert np.array_equal(first, decode(read_instance(images[0]), 0, "x"))
    assert not first.flags.writeable  # shared between requests: nobody may change it
    again = cache.frame(images[0], read_instance(images[0]), 0)
    assert again is first and (cache.hits, cache.misses) == (1, 1)
    for image in images[1:]:
        cache.frame(image, read_instance(image), 0)
    assert cache.size_bytes == 2 * one_frame  # the least recently used one went
    cache.frame(images[0], read_instance(images[0]), 0)
    assert (cache.hits, cache.misses) == (1, 4)
    # the file replaced (same name, new content): decoded again, not served from memory
    replaced = write_image(images[2].path, np.full((64, 80), 5))
    os.utime(replaced.path, ns=(1, 1))
    assert set(np.unique(cache.frame(replaced, read_instance(replaced), 0))) == {5}
    # a frame above the whole budget is decoded, not kept
    small = FrameCache(max_bytes=one_frame - 1)
    small.frame(images[0], read_instance(images[0]), 0)
    assert small.size_bytes == 0
