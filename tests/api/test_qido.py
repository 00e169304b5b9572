"""QIDO-RS on SQLite and PostgreSQL: matching, levels, includefield, paging, errors, clients."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient

from services.core.config import DuplicatePolicy
from services.core.db import qido as qido_core
from services.core.dicom.uids import new_uid
from services.core.ingest import Channel
from services.runtime import Runtime
from tests.api.test_stow import SQLITE_ONLY, new_study, variant

MG_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"
TAGS = {
    "StudyDate": "00080020",
    "StudyTime": "00080030",
    "AccessionNumber": "00080050",
    "InstanceAvailability": "00080056",
    "Modality": "00080060",
    "ModalitiesInStudy": "00080061",
    "SOPClassUID": "00080016",
    "SOPInstanceUID": "00080018",
    "StudyDescription": "00081030",
    "RetrieveURL": "00081190",
    "PatientName": "00100010",
    "PatientID": "00100020",
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SeriesNumber": "00200011",
    "InstanceNumber": "00200013",
    "NumberOfStudyRelatedSeries": "00201206",
    "NumberOfStudyRelatedInstances": "00201208",
    "NumberOfSeriesRelatedInstances": "00201209",
    "Rows": "00280010",
    "Columns": "00280011",
}


@dataclass
class Studies:
    a: str  # the phantom study: 1 MG series, 4 instances, 2024-09-20 14:50:30
    b: str  # Doe^Jane: MG series (2 instances) + OT series (1), 2023-01-05 09:30
    c: str  # DOE^JOHN: 1 MG instance, 2023-06-01, no study time
    a_series: str
    b_mg: str
    b_ot: str
    a_sops: list[str]


@pytest.fixture
def studies(state: Runtime, tiny_study_files: list[Path]) -> Studies:
    ingest = state.ingestor.ingest_dataset
    for path in tiny_study_files:
        ingest(pydicom.dcmread(path), channel=Channel.CLI)
    a = pydicom.dcmread(tiny_study_files[0])
    b_common = {
        "PatientName": "Doe^Jane",
        "PatientID": "ph000700000",  # the same letters as study A's, lower case
        "StudyDate": "20230105",
        "StudyTime": "093000",
        "AccessionNumber": "ACC_2%",
    }
    b_mg = new_study(tiny_study_files[:2], **b_common)
    b_ot = variant(
        tiny_study_files[2],
        StudyInstanceUID=b_mg[0].StudyInstanceUID,
        SeriesInstanceUID=new_uid(),
        SOPInstanceUID=new_uid(),
        Modality="OT",
        SeriesNumber=2,
        **b_common,
    )
    (c,) = new_study(
        tiny_study_files[3:],
        PatientName="DOE^JOHN",
        PatientID="C-3",
        StudyDate="20230601",
        StudyTime=None,
        AccessionNumber="ACCX2",
    )
    for ds in [*b_mg, b_ot, c]:
        ingest(ds, channel=Channel.CLI)
    return Studies(
        a=str(a.StudyInstanceUID),
        b=str(b_mg[0].StudyInstanceUID),
        c=str(c.StudyInstanceUID),
        a_series=str(a.SeriesInstanceUID),
        b_mg=str(b_mg[0].SeriesInstanceUID),
        b_ot=str(b_ot.SeriesInstanceUID),
        a_sops=[str(pydicom.dcmread(p).SOPInstanceUID) for p in tiny_study_files],
    )


def values(item: dict[str, Any], keyword: str) -> list[Any]:
    return list(item[TAGS[keyword]].get("Value", []))


def first(item: dict[str, Any], keyword: str) -> Any:
    return values(item, keyword)[0]


def uids(items: list[dict[str, Any]], keyword: str = "StudyInstanceUID") -> list[str]:
    return [first(i, keyword) for i in items]


def get(client: TestClient, url: str, **params: Any) -> list[dict[str, Any]]:
    response = client.get(url, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    items: list[dict[str, Any]] = response.json()
    return items


# -- study level -----------------------------------------------------------------------------------


def test_all_studies_newest_first_with_counts_and_urls(
    client: TestClient, studies: Studies
) -> None:
    items = get(client, "/dicomweb/studies")
    assert uids(items) == [studies.a, studies.c, studies.b]
    a, c, b = items
    assert first(b, "NumberOfStudyRelatedSeries") == 2
    assert first(b, "NumberOfStudyRelatedInstances") == 3
    assert values(b, "ModalitiesInStudy") == ["MG", "OT"]
    assert first(a, "NumberOfStudyRelatedInstances") == 4
    assert first(a, "PatientName") == {"Alphabetic": "PHANTOM^0000"}
    assert first(a, "StudyDate") == "20240920" and first(a, "StudyTime") == "145030"
    assert first(a, "InstanceAvailability") == "ONLINE"
    assert first(a, "RetrieveURL") == f"http://testserver/dicomweb/studies/{studies.a}"
    assert values(c, "StudyTime") == []  # type 2: present, empty
    assert TAGS["Modality"] not in a and TAGS["StudyDescription"] not in a
    assert list(a) == sorted(a)  # attributes in tag order


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"PatientID": "PH000700000"}, "a"),
        ({"PatientID": "ph000700000"}, "b"),  # IDs are case-sensitive ...
        ({"PatientID": "PH*"}, "a"),  # ... with wildcards too (GLOB on SQLite, LIKE on PG)
        ({"PatientID": "ph0007?0000"}, "b"),
        ({"PatientName": "doe*"}, "cb"),  # names are case-insensitive
        ({"PatientName": "DOE^J?NE"}, "b"),
        ({"PatientName": "doe^jane"}, "b"),
        ({"00100010": "phantom^0000"}, "a"),  # tag form
        ({"PatientName": "*"}, "acb"),
        ({"PatientName": ""}, "acb"),
        ({"StudyDate": "20230105"}, "b"),
        ({"StudyDate": "20230101-20231231"}, "cb"),
        ({"StudyDate": "20230601-"}, "ac"),
        ({"StudyDate": "-20230601"}, "cb"),
        ({"StudyTime": "0930"}, "b"),
        ({"StudyTime": "1400-1500"}, "a"),
        ({"StudyTime": "093000-145030"}, "ab"),
        ({"AccessionNumber": "ACC_2*"}, "b"),  # _ and % are literal, not SQL wildcards
        ({"AccessionNumber": "ACC?2"}, "c"),
        ({"AccessionNumber": "A7-0"}, "a"),
        ({"ModalitiesInStudy": "OT"}, "b"),
        ({"ModalitiesInStudy": "OT,MG"}, "acb"),
        ({"ModalitiesInStudy": "CT"}, ""),
        ({"PatientID": "nobody"}, ""),
        ({"PatientName": "doe*", "StudyDate": "20230601"}, "c"),
    ],
)
def test_study_matching(
    client: TestClient, studies: Studies, params: dict[str, str], expected: str
) -> None:
    items = get(client, "/dicomweb/studies", **params)
    assert uids(items) == [getattr(studies, key) for key in expected]


def test_uid_lists_comma_backslash_or_repeated(client: TestClient, studies: Studies) -> None:
    for query in (
        f"StudyInstanceUID={studies.a},{studies.c}",
        f"StudyInstanceUID={studies.a}%5C{studies.c}",
        f"StudyInstanceUID={studies.a}&0020000D={studies.c}",
    ):
        response = client.get(f"/dicomweb/studies?{query}")
        assert response.status_code == 200, response.text
        assert uids(response.json()) == [studies.a, studies.c]


def test_includefield(client: TestClient, studies: Studies) -> None:
    (plain,) = get(client, "/dicomweb/studies", PatientID="PH000700000")
    assert TAGS["StudyDescription"] not in plain
    for params in (
        {"includefield": "StudyDescription"},
        {"includefield": "00081030,PatientID"},
        {"includefield": "all"},
    ):
        (item,) = get(client, "/dicomweb/studies", PatientID="PH000700000", **params)
        assert first(item, "StudyDescription") == "Synthetic screening mammogram (phantom)"
        assert TAGS["Modality"] not in item  # series-level: not in study results


def test_unavailable_includefield_and_fuzzymatching_warn(
    client: TestClient, studies: Studies
) -> None:
    response = client.get(
        "/dicomweb/studies",
        params={"includefield": "PatientWeight", "fuzzymatching": "true", "PatientName": "doe*"},
    )
    assert response.status_code == 200
    assert uids(response.json()) == [studies.c, studies.b]  # literal matching still done
    warning = response.headers["warning"]
    assert warning.startswith("299 testserver ")
    assert "fuzzymatching parameter is not supported" in warning
    assert "includefield PatientWeight" in warning
    quiet = client.get("/dicomweb/studies", params={"fuzzymatching": "false"})
    assert "warning" not in quiet.headers


def test_limit_offset_and_server_cap(
    client: TestClient, studies: Studies, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert uids(get(client, "/dicomweb/studies", limit=2)) == [studies.a, studies.c]
    assert uids(get(client, "/dicomweb/studies", limit=2, offset=2)) == [studies.b]
    assert get(client, "/dicomweb/studies", offset=5) == []
    pages = [get(client, "/dicomweb/instances", limit=3, offset=o) for o in (0, 3, 6)]
    assert [len(p) for p in pages] == [3, 3, 2]
    every = [i for p in pages for i in p]
    assert len(set(uids(every, "SOPInstanceUID"))) == 8
    assert every == get(client, "/dicomweb/instances")
    monkeypatch.setattr(qido_core, "MAX_RESULTS", 2)
    response = client.get("/dicomweb/studies")
    assert len(response.json()) == 2
    assert "additional results that can be requested" in response.headers["warning"]
    assert "warning" not in client.get("/dicomweb/studies", params={"limit": 1}).headers


def test_no_match_and_unknown_study_are_empty_200(client: TestClient, studies: Studies) -> None:
    assert get(client, "/dicomweb/studies", PatientID="nobody") == []
    assert get(client, "/dicomweb/studies/1.2.3.4/series") == []
    assert get(client, "/dicomweb/studies/1.2.3.4/instances") == []


# -- series and instance levels --------------------------------------------------------------------


def test_series_of_a_study(client: TestClient, studies: Studies) -> None:
    items = get(client, f"/dicomweb/studies/{studies.b}/series")
    assert uids(items, "SeriesInstanceUID") == [studies.b_mg, studies.b_ot]
    assert [first(i, "NumberOfSeriesRelatedInstances") for i in items] == [2, 1]
    assert [first(i, "Modality") for i in items] == ["MG", "OT"]
    assert first(items[1], "RetrieveURL") == (
        f"http://testserver/dicomweb/studies/{studies.b}/series/{studies.b_ot}"
    )
    assert all(first(i, "StudyInstanceUID") == studies.b for i in items)
    assert TAGS["PatientName"] not in items[0]  # scoped to a study: no study attributes
    assert uids(
        get(client, f"/dicomweb/studies/{studies.b}/series", Modality="OT"), "SeriesInstanceUID"
    ) == [studies.b_ot]


def test_series_across_studies(client: TestClient, studies: Studies) -> None:
    (ot,) = get(client, "/dicomweb/series", Modality="OT")
    assert first(ot, "PatientName") == {"Alphabetic": "Doe^Jane"}  # study attributes too
    assert first(ot, "NumberOfStudyRelatedSeries") == 2
    matched = get(client, "/dicomweb/series", PatientID="ph000700000")
    assert uids(matched, "SeriesInstanceUID") == [studies.b_mg, studies.b_ot]
    assert len(get(client, "/dicomweb/series", Modality="MG,OT")) == 4
    assert len(get(client, "/dicomweb/series", SeriesNumber=2)) == 1


def test_instances_of_a_series(client: TestClient, studies: Studies) -> None:
    items = get(client, f"/dicomweb/studies/{studies.a}/series/{studies.a_series}/instances")
    assert uids(items, "SOPInstanceUID") == studies.a_sops  # by instance number
    assert [first(i, "InstanceNumber") for i in items] == [1, 2, 3, 4]
    item = items[0]
    assert first(item, "SOPClassUID") == MG_CLASS
    assert (first(item, "Rows"), first(item, "Columns")) == (160, 128)
    assert first(item, "RetrieveURL").endswith(
        f"/studies/{studies.a}/series/{studies.a_series}/instances/{studies.a_sops[0]}"
    )
    assert TAGS["Modality"] not in item and TAGS["PatientID"] not in item


def test_instances_across_studies_and_of_a_study(client: TestClient, studies: Studies) -> None:
    (one,) = get(client, "/dicomweb/instances", SOPInstanceUID=studies.a_sops[2])
    assert first(one, "PatientID") == "PH000700000" and first(one, "Modality") == "MG"
    assert len(get(client, "/dicomweb/instances", SOPClassUID=MG_CLASS)) == 8
    assert len(get(client, "/dicomweb/instances", Modality="OT")) == 1
    assert len(get(client, "/dicomweb/instances", PatientName="doe*")) == 4
    items = get(client, f"/dicomweb/studies/{studies.a}/instances", InstanceNumber=3)
    assert uids(items, "SOPInstanceUID") == [studies.a_sops[2]]
    assert first(items[0], "Modality") == "MG" and TAGS["PatientName"] not in items[0]
    (with_syntax,) = get(
        client,
        "/dicomweb/instances",
        SOPInstanceUID=studies.a_sops[0],
        includefield="AvailableTransferSyntaxUID",
    )
    assert with_syntax["00083002"]["Value"] == ["1.2.840.10008.1.2.1"]


def test_series_instance_uid_matching(client: TestClient, studies: Studies) -> None:
    (ot,) = get(client, "/dicomweb/series", SeriesInstanceUID=studies.b_ot)
    assert first(ot, "Modality") == "OT" and first(ot, "StudyInstanceUID") == studies.b
    two = get(client, "/dicomweb/series", SeriesInstanceUID=f"{studies.a_series},{studies.b_mg}")
    assert sorted(uids(two, "SeriesInstanceUID")) == sorted([studies.a_series, studies.b_mg])
    in_b = f"/dicomweb/studies/{studies.b}/series"
    assert uids(get(client, in_b, SeriesInstanceUID=studies.b_mg), "SeriesInstanceUID") == [
        studies.b_mg
    ]
    assert get(client, in_b, SeriesInstanceUID=studies.a_series) == []  # another study's
    instances = get(client, "/dicomweb/instances", SeriesInstanceUID=studies.b_mg)
    assert len(instances) == 2
    assert {first(i, "SeriesInstanceUID") for i in instances} == {studies.b_mg}
    assert get(client, "/dicomweb/series", SeriesInstanceUID="1.2.3.4") == []


# -- errors ----------------------------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("/dicomweb/studies?limit=-1", "limit"),
        ("/dicomweb/studies?limit=abc", "limit"),
        ("/dicomweb/studies?limit=0", "limit"),
        ("/dicomweb/studies?offset=-3", "offset"),
        ("/dicomweb/studies?limit=1&limit=2", "limit"),
        ("/dicomweb/studies?StudyDate=2024-01-01", "StudyDate"),
        ("/dicomweb/studies?StudyDate=20241301", "StudyDate"),
        ("/dicomweb/studies?StudyDate=20241231-20240101", "StudyDate"),
        ("/dicomweb/studies?StudyDate=-", "StudyDate"),
        ("/dicomweb/studies?StudyTime=2500", "StudyTime"),
        ("/dicomweb/studies?Foo=bar", "Foo"),
        ("/dicomweb/studies?PatientWeight=70", "PatientWeight"),
        ("/dicomweb/studies?NumberOfStudyRelatedSeries=2", "NumberOfStudyRelatedSeries"),
        ("/dicomweb/studies?SOPInstanceUID=1.2.3", "SOPInstanceUID"),
        ("/dicomweb/studies?StudyInstanceUID=1.2.abc", "1.2.abc"),
        ("/dicomweb/studies?StudyInstanceUID=../../etc", "../../etc"),
        ("/dicomweb/studies?00100020.00100010=x", "sequence"),
        ("/dicomweb/studies?99990010=x", "99990010"),
        ("/dicomweb/studies?fuzzymatching=maybe", "fuzzymatching"),
        ("/dicomweb/studies?PatientID=a&PatientID=b", "PatientID"),
        ("/dicomweb/studies?includefield=NoSuchKeyword", "NoSuchKeyword"),
        ("/dicomweb/instances?InstanceNumber=three", "InstanceNumber"),
        ("/dicomweb/series?Modality=M*,CT", "Modality"),
        ("/dicomweb/studies/1.2.abc/series", "1.2.abc"),
        ("/dicomweb/studies/1.2.3/series/x.y/instances", "x.y"),
    ],
)
def test_bad_query_is_400_naming_the_attribute(
    client: TestClient, studies: Studies, url: str, named: str
) -> None:
    response = client.get(url)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert named in response.json()["detail"]


@SQLITE_ONLY
def test_xml_only_accept_is_406(client: TestClient) -> None:
    response = client.get("/dicomweb/studies", headers={"Accept": "application/dicom+xml"})
    assert response.status_code == 406
    for accept in ("application/json", "application/dicom+json; q=0.9", "*/*"):
        assert client.get("/dicomweb/studies", headers={"Accept": accept}).status_code == 200


# -- a real DICOMweb client over a socket ----------------------------------------------------------


def test_dicomweb_client_stores_then_searches(
    live_url: str, admin_key: str, state: Runtime, tiny_study_files: list[Path]
) -> None:
    client = DICOMwebClient(
        url=f"{live_url}/dicomweb", headers={"Authorization": f"Bearer {admin_key}"}
    )
    datasets = [pydicom.dcmread(p) for p in tiny_study_files]
    study = str(datasets[0].StudyInstanceUID)
    series = str(datasets[0].SeriesInstanceUID)
    result = client.store_instances(datasets)
    assert len(result.ReferencedSOPSequence) == 4
    # dicomweb-client sends "Host: 127.0.0.1" without the port; the URL follows the Host header
    assert result.RetrieveURL.startswith("http://127.0.0.1")
    assert result.RetrieveURL.endswith(f"/dicomweb/studies/{study}")
    assert "FailedSOPSequence" not in result

    found = client.search_for_studies(search_filters={"PatientName": "phantom*"})
    (parsed,) = [pydicom.Dataset.from_json(item) for item in found]
    assert parsed.StudyInstanceUID == study
    assert parsed.NumberOfStudyRelatedInstances == 4 and parsed.ModalitiesInStudy == "MG"
    assert str(parsed.PatientName) == "PHANTOM^0000"
    assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    fuzzy = client.search_for_studies(fuzzymatching=True, search_filters={"PatientName": "PHAN*"})
    assert len(fuzzy) == 1
    assert len(client.search_for_studies(get_remaining=True)) == 1

    (series_item,) = client.search_for_series(study, search_filters={"Modality": "MG"})
    assert pydicom.Dataset.from_json(series_item).NumberOfSeriesRelatedInstances == 4
    page = client.search_for_instances(study, series, limit=2, offset=2)
    numbers = [pydicom.Dataset.from_json(i).InstanceNumber for i in page]
    assert numbers == [3, 4]
    everything = client.search_for_instances(fields=["all"])
    assert len(everything) == 4

    # one good new instance and one altered duplicate (policy refuse): 202, the client parses
    # the failure
    state.ingestor.duplicate_policy = DuplicatePolicy.REFUSE
    (fresh,) = new_study(tiny_study_files[:1])
    altered = variant(tiny_study_files[1], SeriesDescription="altered")
    partial = client.store_instances([fresh, altered])
    assert len(partial.ReferencedSOPSequence) == 1
    (failed,) = partial.FailedSOPSequence
    assert failed.FailureReason == 0x0111
    assert failed.ReferencedSOPInstanceUID == datasets[1].SOPInstanceUID

    logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL)
    with pytest.raises(requests.HTTPError) as refused:  # all failed: 409
        client.store_instances([altered], study_instance_uid=study)
    assert refused.value.response is not None and refused.value.response.status_code == 409
