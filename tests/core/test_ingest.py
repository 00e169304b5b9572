"""The ingest path against real SQLite and PostgreSQL databases and a real filesystem."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services.core.config import DuplicatePolicy
from services.core.db.tables import Instance, Series, Study
from services.core.errors import Conflict, InvalidInput, InvalidUID, NoPixelData, NotDicom
from services.core.ingest import Channel, Ingestor, Outcome, read_header, same_instance
from services.core.storage import InstanceStore


def stage(store: InstanceStore, source: Path | bytes) -> Path:
    path = store.new_staging_path()
    if isinstance(source, bytes):
        path.write_bytes(source)
    else:
        shutil.copyfile(source, path)
    return path


def count(sessions: sessionmaker[Session], table: type) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def test_stores_file_and_index_rows(
    ingestor: Ingestor, store: InstanceStore, sessions: sessionmaker[Session], tiny_study_files
) -> None:
    results = [
        ingestor.ingest_file(stage(store, p), channel=Channel.DIMSE, source="MODALITY")
        for p in tiny_study_files
    ]
    assert {r.outcome for r in results} == {Outcome.STORED}
    assert count(sessions, Study) == 1
    assert count(sessions, Series) == len({r.series_uid for r in results})
    assert count(sessions, Instance) == 4
    with sessions() as s:
        row = s.get(Instance, results[0].sop_instance_uid)
        assert row is not None and row.source == "MODALITY" and row.channel == "dimse"
        stored = store.absolute(row.path)
        study = s.get(Study, results[0].study_uid)
        assert study is not None and study.patient_id
    original = pydicom.dcmread(tiny_study_files[0])
    assert stored.read_bytes() == tiny_study_files[0].read_bytes()
    assert str(original.SOPInstanceUID) == results[0].sop_instance_uid
    assert store.leftover_staging() == []


def test_same_bytes_twice_is_idempotent(
    ingestor: Ingestor, store: InstanceStore, sessions: sessionmaker[Session], tiny_study_files
) -> None:
    first = ingestor.ingest_file(stage(store, tiny_study_files[0]), channel=Channel.STOW)
    again = ingestor.ingest_file(stage(store, tiny_study_files[0]), channel=Channel.DIMSE)
    assert (first.outcome, again.outcome) == (Outcome.STORED, Outcome.DUPLICATE)
    assert count(sessions, Instance) == 1
    assert store.leftover_staging() == []


def _altered(path: Path, tmp_path: Path) -> Path:
    ds = pydicom.dcmread(path)
    ds.SeriesDescription = "changed"
    out = tmp_path / "altered.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def test_different_content_keeps_the_stored_instance_by_default(
    ingestor: Ingestor, store: InstanceStore, tiny_study_files, tmp_path: Path
) -> None:
    """keep-first (the default): the stored instance stands, the new one is dropped, KEPT."""
    ingestor.ingest_file(stage(store, tiny_study_files[0]), channel=Channel.STOW)
    result = ingestor.ingest_file(
        stage(store, _altered(tiny_study_files[0], tmp_path)), channel=Channel.DIMSE
    )
    assert result.outcome is Outcome.KEPT
    with ingestor.sessions() as s:
        row = s.scalars(select(Instance)).one()
    assert (row.channel, row.replaced_count) == ("stow", 0)
    assert store.absolute(row.path).read_bytes() == tiny_study_files[0].read_bytes()
    assert store.leftover_staging() == []


def test_different_content_refused_with_policy_refuse(
    store: InstanceStore, sessions: sessionmaker[Session], tiny_study_files, tmp_path: Path
) -> None:
    ingestor = Ingestor(store, sessions, DuplicatePolicy.REFUSE)
    ingestor.ingest_file(stage(store, tiny_study_files[0]), channel=Channel.STOW)
    with pytest.raises(Conflict, match="already stored with different content"):
        ingestor.ingest_file(
            stage(store, _altered(tiny_study_files[0], tmp_path)), channel=Channel.STOW
        )
    with ingestor.sessions() as s:
        row = s.scalars(select(Instance)).one()
    assert store.absolute(row.path).read_bytes() == tiny_study_files[0].read_bytes()
    assert store.leftover_staging() == []


def test_replace_policy_keeps_the_old_file(
    store: InstanceStore, sessions: sessionmaker[Session], tiny_study_files, tmp_path: Path
) -> None:
    ingestor = Ingestor(store, sessions, DuplicatePolicy.REPLACE)
    ingestor.ingest_file(stage(store, tiny_study_files[0]), channel=Channel.STOW)
    altered = _altered(tiny_study_files[0], tmp_path)
    result = ingestor.ingest_file(stage(store, altered), channel=Channel.STOW)
    assert result.outcome is Outcome.REPLACED
    with sessions() as s:
        row = s.scalars(select(Instance)).one()
    assert row.replaced_count == 1
    assert store.absolute(row.path).read_bytes() == altered.read_bytes()
    kept = list(store.replaced.iterdir())
    assert [k.read_bytes() for k in kept] == [tiny_study_files[0].read_bytes()]


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (b"this is not DICOM at all", NotDicom, "not a DICOM"),
        (b"", NotDicom, "not a DICOM"),
    ],
)
def test_not_dicom_refused(
    ingestor: Ingestor, store: InstanceStore, content: bytes, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        ingestor.ingest_file(stage(store, content), channel=Channel.STOW)
    assert store.leftover_staging() == []
    assert not any(store.instances.iterdir())


def test_truncated_file_refused(ingestor: Ingestor, store: InstanceStore, tiny_study_files) -> None:
    data = tiny_study_files[0].read_bytes()
    with pytest.raises(NotDicom, match="truncated"):
        ingestor.ingest_file(stage(store, data[: len(data) - 1000]), channel=Channel.DIMSE)
    with pytest.raises(NotDicom, match="truncated"):  # cut inside the header
        ingestor.ingest_file(stage(store, data[:400]), channel=Channel.DIMSE)
    assert store.leftover_staging() == []
    assert not any(store.instances.iterdir())


def test_truncated_encapsulated_file_refused(ingestor: Ingestor, store: InstanceStore) -> None:
    data = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()  # type: ignore[arg-type]
    with pytest.raises(NotDicom, match="truncated"):
        ingestor.ingest_file(stage(store, data[: len(data) - 100]), channel=Channel.DIMSE)
    assert store.leftover_staging() == []


def _modified(path: Path, tmp_path: Path, **changes: object) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if "SOPInstanceUID" in changes and changes["SOPInstanceUID"] is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = changes["SOPInstanceUID"]
    out = tmp_path / "modified.dcm"
    ds.save_as(out, enforce_file_format=False)
    return out


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"StudyInstanceUID": "../../etc"}, InvalidUID, "Study Instance UID"),
        ({"SeriesInstanceUID": "1.2.3/../4"}, InvalidUID, "Series Instance UID"),
        ({"SOPInstanceUID": "1.2.abc"}, InvalidUID, "SOP Instance UID"),
        ({"StudyInstanceUID": None}, InvalidInput, "StudyInstanceUID"),
        ({"PixelData": None}, NoPixelData, "no Pixel Data"),
    ],
)
def test_invalid_instances_refused(
    ingestor: Ingestor,
    store: InstanceStore,
    tiny_study_files,
    tmp_path: Path,
    changes: dict[str, object],
    error: type,
    message: str,
) -> None:
    path = _modified(tiny_study_files[0], tmp_path, **changes)
    with pytest.raises(error, match=message):
        ingestor.ingest_file(stage(store, path), channel=Channel.STOW)
    assert store.leftover_staging() == []
    assert not any(store.instances.iterdir())
    assert not (tmp_path.parent / "etc").exists()


def test_wrong_study_for_request_refused(
    ingestor: Ingestor, store: InstanceStore, tiny_study_files
) -> None:
    with pytest.raises(InvalidInput, match="not to the study"):
        ingestor.ingest_file(
            stage(store, tiny_study_files[0]), channel=Channel.STOW, expected_study_uid="1.2.3"
        )


def test_concurrent_ingest_of_one_study(
    ingestor: Ingestor, store: InstanceStore, sessions: sessionmaker[Session], tiny_study_files
) -> None:
    """Four threads store the four views (and each one twice) at once: four rows, no errors."""
    errors: list[BaseException] = []
    staged = [stage(store, p) for p in tiny_study_files * 2]

    def run(path: Path) -> None:
        try:
            ingestor.ingest_file(path, channel=Channel.DIMSE)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in staged]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert count(sessions, Instance) == 4
    assert count(sessions, Study) == 1
    assert store.leftover_staging() == []


def test_ingest_dataset_uses_the_same_path(
    ingestor: Ingestor, sessions: sessionmaker[Session], tiny_study_files
) -> None:
    ds = pydicom.dcmread(tiny_study_files[1])
    result = ingestor.ingest_dataset(ds, channel=Channel.WORKER)
    assert result.outcome is Outcome.STORED
    with sessions() as s:
        row = s.get(Instance, str(ds.SOPInstanceUID))
        assert row is not None and row.channel == "worker"


def _complete_testdata_files() -> list[Path]:
    """pydicom's bundled files that carry every UID ingest needs (deflated ones excluded)."""
    import warnings

    from pydicom.data import get_testdata_files

    keep = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(get_testdata_files("*.dcm")):
            try:
                ds = pydicom.dcmread(name)
            except Exception:
                continue
            meta = ds.file_meta
            if (
                all(ds.get(k) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"))
                and meta.get("MediaStorageSOPInstanceUID") == ds.SOPInstanceUID
                and meta.get("TransferSyntaxUID") not in (None, "1.2.840.10008.1.2.1.99")
                and "truncated" not in name
            ):
                keep.append(Path(name))
    return keep


@pytest.mark.slow
def test_bundled_files_pass_and_their_truncations_fail(tmp_path: Path) -> None:
    """Real-world files from many vendors: whole ones pass, ones cut short anywhere fail."""
    from services.core.ingest import read_header

    files = _complete_testdata_files()
    assert len(files) > 40
    for path in files:
        read_header(path)
        data = path.read_bytes()
        for cut in (1, 7, 100, len(data) // 3):
            short = tmp_path / "short.dcm"
            short.write_bytes(data[: len(data) - cut])
            with pytest.raises(NotDicom):
                read_header(short)


# -- same instance, other file meta --------------------------------------------------------------


def _resaved(path: Path, out: Path, **meta: str) -> Path:
    """``path``'s data set written again with some file meta attributes changed."""
    ds = pydicom.dcmread(path)
    for keyword, value in meta.items():
        setattr(ds.file_meta, keyword, value)
    ds.save_as(out, enforce_file_format=True)
    return out


def _body(path: Path) -> bytes:
    """The bytes after the file meta group (its length is at offset 140)."""
    data = path.read_bytes()
    return data[144 + struct.unpack("<I", data[140:144])[0] :]


def test_same_data_set_with_other_file_meta_is_a_duplicate(
    ingestor: Ingestor, store: InstanceStore, tiny_study_files: list[Path], tmp_path: Path
) -> None:
    """The SCP writes pynetdicom's file meta, STOW-RS keeps the sender's: still one instance."""
    original = tiny_study_files[0]
    first = ingestor.ingest_file(stage(store, original), channel=Channel.STOW)
    other = _resaved(
        original,
        tmp_path / "other-meta.dcm",
        ImplementationClassUID="1.2.826.0.1.3680043.9.3811.3.0.4",
        ImplementationVersionName="PYNETDICOM_304",
        SourceApplicationEntityTitle="MODALITY",
    )
    assert other.read_bytes() != original.read_bytes()
    assert _body(other) == _body(original)
    again = ingestor.ingest_file(stage(store, other), channel=Channel.DIMSE)
    assert (first.outcome, again.outcome) == (Outcome.STORED, Outcome.DUPLICATE)
    with ingestor.sessions() as s:
        row = s.scalars(select(Instance)).one()
    assert store.absolute(row.path).read_bytes() == original.read_bytes()
    assert store.leftover_staging() == []


def _in_syntax(source: Path, syntax: str, out: Path) -> Path:
    """``source`` written in ``syntax`` (compressed with pydicom's encoders, or decompressed)."""
    ds = pydicom.dcmread(source)
    if UID(syntax).is_compressed:
        ds.compress(syntax, generate_instance_uid=False)
    else:
        if UID(ds.file_meta.TransferSyntaxUID).is_compressed:
            ds.decompress(generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = syntax
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out


@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless],
)
def test_the_same_data_set_in_another_transfer_syntax_is_a_duplicate(
    store: InstanceStore,
    sessions: sessionmaker[Session],
    tiny_study_files: list[Path],
    tmp_path: Path,
    syntax: str,
) -> None:
    """A re-send in another encoding: success (DUPLICATE), the stored file is not rewritten;
    under every policy, refuse included."""
    ingestor = Ingestor(store, sessions, DuplicatePolicy.REFUSE)
    original = tiny_study_files[0]
    ingestor.ingest_file(stage(store, original), channel=Channel.DIMSE)
    other = _in_syntax(original, syntax, tmp_path / "other.dcm")
    assert _body(other) != _body(original)
    again = ingestor.ingest_file(stage(store, other), channel=Channel.DIMSE)
    assert again.outcome is Outcome.DUPLICATE
    with ingestor.sessions() as s:
        row = s.scalars(select(Instance)).one()
    assert row.transfer_syntax_uid == ExplicitVRLittleEndian
    assert store.absolute(row.path).read_bytes() == original.read_bytes()
    assert store.leftover_staging() == []


@pytest.mark.parametrize("change", ["relabelled", "decompressed"])
def test_a_compressed_instance_sent_again_decoded_or_relabelled_is_a_duplicate(
    store: InstanceStore, sessions: sessionmaker[Session], tmp_path: Path, change: str
) -> None:
    ingestor = Ingestor(store, sessions, DuplicatePolicy.REFUSE)
    original = Path(str(get_testdata_file("JPEG2000.dcm")))  # JPEG 2000 (lossy)
    ingestor.ingest_file(stage(store, original), channel=Channel.STOW)
    if change == "relabelled":  # the same encapsulated bytes, labelled lossless
        other = _resaved(original, tmp_path / "other.dcm", TransferSyntaxUID=JPEG2000Lossless)
    else:
        other = _in_syntax(original, ExplicitVRLittleEndian, tmp_path / "other.dcm")
    result = ingestor.ingest_file(stage(store, other), channel=Channel.DIMSE)
    assert result.outcome is Outcome.DUPLICATE
    with ingestor.sessions() as s:
        row = s.scalars(select(Instance)).one()
    assert store.absolute(row.path).read_bytes() == original.read_bytes()
    assert store.leftover_staging() == []


@pytest.mark.parametrize("change", ["pixel", "element"])
def test_other_content_in_another_transfer_syntax_is_not_a_duplicate(
    store: InstanceStore,
    sessions: sessionmaker[Session],
    tiny_study_files: list[Path],
    tmp_path: Path,
    change: str,
) -> None:
    ingestor = Ingestor(store, sessions, DuplicatePolicy.REFUSE)
    original = tiny_study_files[0]
    ingestor.ingest_file(stage(store, original), channel=Channel.STOW)
    ds = pydicom.dcmread(original)
    if change == "pixel":
        pixels = ds.pixel_array.copy()
        pixels[0, 0] += 1
        ds.PixelData = pixels.tobytes()
    else:
        ds.SeriesDescription = "changed"
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    other = tmp_path / "other.dcm"
    pydicom.dcmwrite(other, ds, enforce_file_format=True)
    with pytest.raises(Conflict, match="already stored with different content"):
        ingestor.ingest_file(stage(store, other), channel=Channel.STOW)
    assert count(ingestor.sessions, Instance) == 1
    assert store.leftover_staging() == []


def test_same_instance_compares_files_without_file_meta_whole(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    a.write_bytes(b"no preamble, no meta")
    b.write_bytes(b"no preamble, no meta")
    c.write_bytes(b"no preamble, no meta!")
    assert same_instance(a, b) and not same_instance(a, c)


# -- other writers -------------------------------------------------------------------------------


class InterleavingStore(InstanceStore):
    """A real store that lets another writer run just before or just after it places a file."""

    def __init__(self, root: Path, *, before: Callable[[], None] | None = None) -> None:
        super().__init__(root)
        self.before, self.after = before, cast(Callable[[], None] | None, None)

    def place(self, staged: Path, relative: str) -> Path:
        if self.before is not None:
            hook, self.before = self.before, None
            hook()
        target = super().place(staged, relative)
        if self.after is not None:
            hook, self.after = self.after, None
            hook()
        return target


def _unlocked_writer(ingestor: Ingestor, source: Path) -> Callable[[], None]:
    """Store ``source`` without taking the UID's lock (a writer on another host, or an old one)."""

    def write() -> None:
        staged = stage(ingestor.store, source)
        ingestor._store(staged, read_header(staged), channel=Channel.STOW, source=None)

    return write


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("theirs", ["same", "other"])
def test_a_writer_in_between_never_makes_a_false_success(
    store: InstanceStore,
    sessions: sessionmaker[Session],
    tiny_study_files: list[Path],
    tmp_path: Path,
    when: str,
    theirs: str,
) -> None:
    """Another writer stores the same UID between our row check and our commit: we answer
    DUPLICATE only when its content is ours, and the row always describes the file on disk
    (policy refuse: other content is an error, not the keep-first warning)."""
    ours = tiny_study_files[0]
    their_file = ours if theirs == "same" else _altered(ours, tmp_path)
    other = Ingestor(InstanceStore(store.root), sessions)
    interleaving = InterleavingStore(store.root)
    setattr(interleaving, when, _unlocked_writer(other, their_file))
    ingestor = Ingestor(interleaving, sessions, DuplicatePolicy.REFUSE)
    staged = stage(store, ours)
    if theirs == "same":
        assert ingestor.ingest_file(staged, channel=Channel.DIMSE).outcome is Outcome.DUPLICATE
    else:
        with pytest.raises(Conflict):
            ingestor.ingest_file(staged, channel=Channel.DIMSE)
    assert interleaving.before is None and interleaving.after is None  # the writer ran
    with sessions() as s:
        row = s.scalars(select(Instance)).one()
    assert store.absolute(row.path).read_bytes() == their_file.read_bytes()
    assert store.leftover_staging() == []


HOLD_LOCK = """
import sys
from pathlib import Path
from services.core.storage import InstanceStore
with InstanceStore(Path(sys.argv[1])).lock(sys.argv[2]):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_ingest_waits_for_another_process_holding_the_uid_lock(
    ingestor: Ingestor, store: InstanceStore, tiny_study_files: list[Path]
) -> None:
    uid = str(pydicom.dcmread(tiny_study_files[0]).SOPInstanceUID)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(store.root), uid],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert holder.stdin is not None and holder.stdout is not None
    results: list[Outcome] = []
    try:
        assert holder.stdout.readline().strip() == "held"
        staged = stage(store, tiny_study_files[0])
        thread = threading.Thread(
            target=lambda: results.append(
                ingestor.ingest_file(staged, channel=Channel.DIMSE).outcome
            )
        )
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and results == []  # waiting for the other process
        holder.stdin.write("\n")
        holder.stdin.flush()
        thread.join(30)
        assert results == [Outcome.STORED]
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdin.close()
        holder.stdout.close()
