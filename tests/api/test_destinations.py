"""/destinations (admin) over HTTP on SQLite and PostgreSQL, and C-ECHO to real dcmtk storescp
peers: one accepting only the uncompressed syntaxes, one accepting JPEG 2000 too."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from services.core.auth import Role
from tests.conftest import free_port
from tests.dicomtools import require

UNCOMPRESSED = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]


@pytest.fixture
def storescp() -> Iterator[Callable[..., int]]:
    require("storescp", "dcmtk")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> int:
        port = free_port()
        proc = subprocess.Popen(
            ["storescp", *options, "-aet", "PACS", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        time.sleep(0.5)
        assert proc.poll() is None, "storescp did not start"
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def add(client: TestClient, **fields: object) -> dict[str, object]:
    body = {"name": "main PACS", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, **fields}
    response = client.post("/destinations", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, object] = response.json()
    return result


def test_crud_is_audited(client: TestClient) -> None:
    made = add(client)
    assert made["syntaxes"] is None  # detected at the first association
    assert client.get(f"/destinations/{made['id']}").json()["ae_title"] == "PACS"
    assert client.get("/destinations/PACS").json()["id"] == made["id"]  # by AE title
    changed = client.put(f"/destinations/{made['id']}", json={"port": 11112})
    assert changed.status_code == 200 and changed.json()["port"] == 11112
    assert client.delete("/destinations/main PACS").status_code == 204
    assert client.get(f"/destinations/{made['id']}").status_code == 404
    entries = client.get("/audit", params={"entity": "destination"}).json()["items"]
    assert [e["action"] for e in entries] == ["delete", "update", "create"]
    assert entries[1]["before"]["port"] == 104 and entries[1]["after"]["port"] == 11112


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"ae_title": "A" * 17}, "AE title"),
        ({"ae_title": "BAD\\AE"}, "AE title"),
        ({"port": 0}, "port 0 is out of range"),
        ({"host": "pacs; rm -rf"}, "not a host name"),
        ({"syntaxes": ["jpeg"]}, "must be UIDs"),
    ],
)
def test_bad_values_are_refused_naming_the_field(
    client: TestClient, fields: dict[str, object], words: str
) -> None:
    body = {"name": "x", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, **fields}
    response = client.post("/destinations", json=body)
    assert response.status_code == 422 and words in response.text
    assert client.get("/destinations").json() == []


def test_a_second_destination_with_the_same_ae_title_is_409(client: TestClient) -> None:
    add(client)
    again = client.post(
        "/destinations", json={"name": "other", "ae_title": "PACS", "host": "h", "port": 1}
    )
    assert again.status_code == 409 and "exists already" in again.json()["detail"]


def test_operators_cannot_see_or_change_destinations(
    anon_client: TestClient, make_key: Callable[..., str]
) -> None:
    operator = {"Authorization": f"Bearer {make_key(Role.OPERATOR)}"}
    assert anon_client.get("/destinations", headers=operator).status_code == 403
    body = {"name": "x", "ae_title": "PACS", "host": "h", "port": 1}
    assert anon_client.post("/destinations", json=body, headers=operator).status_code == 403


@pytest.mark.tools
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_echo_answers_status_and_time_and_detects_the_syntaxes(
    client: TestClient, storescp: Callable[..., int]
) -> None:
    plain = add(client, name="plain", ae_title="PACS", port=storescp())
    j2k = add(client, name="j2k", ae_title="PACS2", port=storescp("+xa"))
    # storescp answers any called AE title; each destination keeps its own
    first = client.post(f"/destinations/{plain['id']}/echo").json()
    assert (first["reachable"], first["status"], first["error"]) == (True, "0x0000", None)
    assert 0 < first["rtt_ms"] < 10_000
    assert first["accepted_syntaxes"] == UNCOMPRESSED
    assert first["destination"]["syntaxes"] == UNCOMPRESSED  # recorded at the first association
    second = client.post(f"/destinations/{j2k['id']}/echo").json()
    assert {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"} <= set(second["accepted_syntaxes"])
    detect = [
        e
        for e in client.get("/audit", params={"entity": "destination"}).json()["items"]
        if e["action"] == "detect"
    ]
    assert len(detect) == 2 and {e["actor"] for e in detect} == {"system"}

    down = add(client, name="down", ae_title="DOWN", port=free_port())
    gone = client.post(f"/destinations/{down['id']}/echo").json()
    assert gone["reachable"] is False and "refused or unreachable" in gone["error"]
    assert gone["destination"]["syntaxes"] is None


def test_echo_of_a_storage_only_peer_is_an_answer_not_a_500(client: TestClient) -> None:
    """A PACS that accepts storage but not the Verification SOP Class (found on the console's
    echo button: pynetdicom raised and the route answered 500): reachable, with the reason,
    and its syntaxes still learnt."""
    from tests.api.test_forwards import Pacs

    peer = Pacs([])
    try:
        made = client.post(
            "/destinations",
            json={"name": "storage only", "ae_title": "PACS", "host": "127.0.0.1",
                  "port": peer.port},
        )  # fmt: skip
        assert made.status_code == 201, made.text
        echo = client.post(f"/destinations/{made.json()['id']}/echo")
    finally:
        peer.close()
    assert echo.status_code == 200, echo.text
    body = echo.json()
    assert body["reachable"] is True and body["status"] is None
    assert "not the Verification SOP Class" in body["error"]
    assert "1.2.840.10008.1.2.1" in body["accepted_syntaxes"]
