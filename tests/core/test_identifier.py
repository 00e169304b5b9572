"""C-FIND/C-GET identifiers as index queries (QIDO-RS's matching), on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from services.core.db.identifier import (
    UTF8,
    IdentifierError,
    Model,
    find_request,
    get_query,
    response,
)
from services.core.db.qido import Level, iter_matches, matching_instances
from services.core.ingest import Channel, Ingestor
from tests.conftest import TINY, generate_study


def identifier(**keys: object) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture
def two_patients(ingestor: Ingestor, tiny_study_files: list[Path], tmp_path: Path) -> list[Path]:
    files = list(tiny_study_files)
    for view, ds in generate_study(1, seed=11, config=TINY).datasets.items():
        ds.PatientName = "Müller^Jürgen"  # non-ASCII: answered in UTF-8
        ds.save_as(tmp_path / f"{view}.dcm", enforce_file_format=True)
        files.append(tmp_path / f"{view}.dcm")
    for path in files:
        staged = ingestor.store.new_staging_path()
        shutil.copyfile(path, staged)
        ingestor.ingest_file(staged, channel=Channel.CLI)
    return files


def test_matching_and_return_keys() -> None:
    request = find_request(
        identifier(
            QueryRetrieveLevel="SERIES",
            PatientName="doe*",
            StudyInstanceUID=["1.2.3", "1.2.4"],
            Modality="",
            PatientAge="",
            RetrieveAETitle="",
        ),
        Model.STUDY_ROOT,
    )
    query = request.query
    assert query.level is Level.SERIES and request.level_name == "SERIES"
    assert {a.keyword: v for a, v in query.filters} == {
        "PatientName": ["doe*"],
        "StudyInstanceUID": ["1.2.3", "1.2.4"],
    }
    assert {"Modality", "SeriesInstanceUID", "StudyInstanceUID"} <= query.fields
    assert [e.keyword for e in request.unanswered] == ["PatientAge"]
    assert request.retrieve_ae


@pytest.mark.parametrize(
    ("keys", "model", "message"),
    [
        ({}, Model.STUDY_ROOT, "no Query/Retrieve Level"),
        ({"QueryRetrieveLevel": "PATIENT"}, Model.STUDY_ROOT, "no PATIENT level"),
        ({"QueryRetrieveLevel": "STUDY", "PatientAge": "030Y"}, Model.PATIENT_ROOT, "PatientAge"),
        ({"QueryRetrieveLevel": "PATIENT", "StudyDate": "2024"}, Model.PATIENT_ROOT, "StudyDate"),
        ({"QueryRetrieveLevel": "STUDY", "StudyDate": "20241301"}, Model.STUDY_ROOT, "not a date"),
    ],
)
def test_what_cannot_be_answered_names_the_element(
    keys: dict[str, str], model: Model, message: str
) -> None:
    with pytest.raises(IdentifierError, match=message) as raised:
        find_request(identifier(**keys), model)
    assert raised.value.tags


def test_a_bad_patient_value_is_not_repeated_in_the_error() -> None:
    with pytest.raises(IdentifierError, match="PatientBirthDate") as raised:
        find_request(
            identifier(QueryRetrieveLevel="STUDY", PatientBirthDate="19701301-19711231"),
            Model.STUDY_ROOT,
        )
    assert "1970" not in str(raised.value) and "1971" not in str(raised.value)


def test_sequence_matching_is_refused() -> None:
    item = identifier(CodeValue="123")
    with pytest.raises(IdentifierError, match="sequence") as raised:
        find_request(
            identifier(QueryRetrieveLevel="STUDY", ProcedureCodeSequence=[item]),
            Model.STUDY_ROOT,
        )
    assert raised.value.tags == [pydicom.tag.Tag("ProcedureCodeSequence")]


def test_patient_level_pages_through_every_patient(
    two_patients: list[Path], sessions: sessionmaker[Session]
) -> None:
    request = find_request(
        identifier(
            QueryRetrieveLevel="PATIENT",
            PatientName="",
            NumberOfPatientRelatedStudies="",
            NumberOfPatientRelatedSeries="",
            NumberOfPatientRelatedInstances="",
        ),
        Model.PATIENT_ROOT,
    )
    found = [
        response(request, m, ae_title="CRGATE")
        for m in iter_matches(sessions, request.query, page=1)
    ]
    originals = [pydicom.dcmread(p) for p in two_patients]
    assert sorted(str(f.PatientID) for f in found) == sorted({str(d.PatientID) for d in originals})
    for match in found:
        assert match.QueryRetrieveLevel == "PATIENT"
        assert int(match.NumberOfPatientRelatedStudies) == 1
        assert int(match.NumberOfPatientRelatedSeries) >= 1
        assert int(match.NumberOfPatientRelatedInstances) == 4
    (german,) = [f for f in found if "Müller" in str(f.PatientName)]
    assert german.SpecificCharacterSet == UTF8
    encoded = pydicom.filebase.DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(encoded, german)
    assert "Müller".encode() in encoded.getvalue()


def test_person_names_match_case_insensitively_as_in_qido(
    two_patients: list[Path], sessions: sessionmaker[Session]
) -> None:
    request = find_request(
        identifier(QueryRetrieveLevel="STUDY", PatientName="müller*"), Model.STUDY_ROOT
    )
    (match,) = iter_matches(sessions, request.query)
    assert match.StudyInstanceUID == pydicom.dcmread(two_patients[4]).StudyInstanceUID


def test_get_needs_the_levels_unique_key_and_finds_every_instance_under_it(
    two_patients: list[Path], sessions: sessionmaker[Session]
) -> None:
    with pytest.raises(IdentifierError, match="needs SeriesInstanceUID"):
        get_query(identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2"), Model.STUDY_ROOT)
    patient = str(pydicom.dcmread(two_patients[0]).PatientID)
    query = get_query(
        identifier(QueryRetrieveLevel="PATIENT", PatientID=patient), Model.PATIENT_ROOT
    )
    with sessions() as session:
        found = {row.sop_instance_uid for row in matching_instances(session, query)}
    assert found == {str(pydicom.dcmread(p).SOPInstanceUID) for p in two_patients[:4]}
