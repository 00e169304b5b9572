"""Forwarding faults against real pynetdicom peers (issue 12): a refused object fails at once
with the peer's status and Error Comment and is re-sent (audited); 0xA700 is retried then sent;
a rejected association is retried up to the limit. Through the API, on SQLite and PostgreSQL,
with the in-process queue and housekeeping of `crgate serve`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from services.core import forwards
from services.core.config import Settings
from services.core.db.tables import Instance
from services.core.destinations import DestinationSpec, create_destination
from services.core.forwards import ForwardObject
from services.runtime import Runtime
from tests.conftest import free_port


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        arrival_sweep_seconds=0.1,
        forward_retry_seconds=0.2,
        forward_max_attempts=3,
    )


class Pacs:
    """A pynetdicom storage SCP that answers each C-STORE with the next of ``answers``
    (then success); ``ae_title`` other than PACS rejects associations called PACS."""

    def __init__(self, answers: list[int], comment: str = "", ae_title: str = "PACS") -> None:
        self.answers = list(answers)
        self.comment = comment
        self.received: list[Dataset] = []
        self.port = free_port()
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = True
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: Any) -> Any:
        code = self.answers.pop(0) if self.answers else 0x0000
        if code == 0x0000:
            self.received.append(event.dataset)
            return 0x0000
        status = Dataset()
        status.Status = code
        status.ErrorComment = self.comment
        return status

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pacs() -> Iterator[Callable[..., Pacs]]:
    made: list[Pacs] = []

    def make(answers: list[int], comment: str = "", ae_title: str = "PACS") -> Pacs:
        made.append(Pacs(answers, comment, ae_title))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


def _register(state: Runtime, port: int, name: str = "pacs") -> None:
    with state.sessions() as session, session.begin():
        spec = DestinationSpec(name, "PACS", "127.0.0.1", port)
        create_destination(session, spec, actor="test")


def _objects(state: Runtime, study_uid: str, n: int = 2) -> list[ForwardObject]:
    with state.sessions() as session:
        uids = session.scalars(
            select(Instance.sop_instance_uid)
            .where(Instance.study_uid == study_uid)
            .order_by(Instance.sop_instance_uid)
        ).all()
    return [ForwardObject(study_uid, uid, "original") for uid in uids[:n]]


def _until(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not reached in {timeout} s: {check()!r}")  # pragma: no cover


def _states(client: TestClient, **params: str) -> list[str]:
    body = client.get("/forwards", params=params).json()
    return sorted(item["state"] for item in body["items"])


def test_a_refused_object_fails_at_once_shows_why_and_is_resent(
    client: TestClient, state: Runtime, mg_study: str, pacs: Callable[..., Pacs]
) -> None:
    peer = pacs([0xC000], comment="no room for this modality")
    _register(state, peer.port)
    rows = forwards.request(state.sessions, state.queue, "pacs", _objects(state, mg_study), "t")
    _until(lambda: _states(client) == ["failed", "sent"])
    failed = client.get("/forwards", params={"state": "failed"}).json()
    assert failed["total"] == 1
    (item,) = failed["items"]
    assert (item["status"], item["error"], item["attempts"]) == (
        "0xC000",
        "no room for this modality",
        1,
    )
    assert item["destination"] == "pacs" and item["id"] in {r.id for r in rows}
    sent = client.get("/forwards", params={"state": "sent", "destination": "PACS"}).json()
    assert sent["items"][0]["syntax"] == "1.2.840.10008.1.2"  # the peer picked implicit VR
    assert sent["items"][0]["status"] == "0x0000"
    assert len(peer.received) == 1

    bad = client.get("/forwards", params={"state": "lost"})
    assert bad.status_code == 422 and "is not one of queued" in bad.json()["detail"]
    assert client.get("/forwards/nope").status_code == 404
    not_failed = client.post(f"/forwards/{sent['items'][0]['id']}/resend")
    assert not_failed.status_code == 409

    resent = client.post(f"/forwards/{item['id']}/resend")
    assert resent.status_code == 200 and resent.json()["forward_ids"] == [item["id"]]
    _until(lambda: client.get(f"/forwards/{item['id']}").json()["state"] == "sent")
    again = client.get(f"/forwards/{item['id']}").json()
    assert (again["status"], again["error"], again["attempts"]) == ("0x0000", None, 1)
    assert len(peer.received) == 2
    audit = client.get("/audit", params={"entity": "forward"}).json()["items"]
    assert [(a["action"], a["entity_id"]) for a in audit] == [("resend", item["id"])]
    assert audit[0]["before"]["forwards"][0]["status"] == "0xC000"


def test_out_of_resources_is_retried_then_sent(
    client: TestClient, state: Runtime, mg_study: str, pacs: Callable[..., Pacs]
) -> None:
    peer = pacs([0xA700], comment="busy")
    _register(state, peer.port)
    (row,) = forwards.request(
        state.sessions, state.queue, "pacs", _objects(state, mg_study, 1), "t"
    )
    retrying = _until(
        lambda: (f := client.get(f"/forwards/{row.id}").json())["state"] == "retrying" and f
    )
    assert (retrying["status"], retrying["error"], retrying["attempts"]) == ("0xA700", "busy", 1)
    assert retrying["next_attempt_at"] is not None
    done = _until(lambda: (f := client.get(f"/forwards/{row.id}").json())["state"] == "sent" and f)
    assert (done["attempts"], done["status"]) == (2, "0x0000")
    assert len(peer.received) == 1
    metrics = client.get("/metrics").text
    assert 'crgate_forwarded_objects_total{state="retrying"}' in metrics


def test_a_rejected_association_is_retried_up_to_the_limit_then_resent(
    client: TestClient, state: Runtime, mg_study: str, pacs: Callable[..., Pacs]
) -> None:
    peer = pacs([], ae_title="OTHER")  # rejects associations called PACS
    _register(state, peer.port)
    forwards.request(state.sessions, state.queue, "pacs", _objects(state, mg_study), "t")
    _until(lambda: _states(client) == ["failed", "failed"])
    items = client.get("/forwards", params={"state": "failed"}).json()["items"]
    assert {(i["attempts"], i["status"]) for i in items} == {(3, None)}
    assert all(
        i["error"].startswith("gave up after 3 attempts: association rejected") for i in items
    )
    assert peer.received == []
    resent = client.post("/forwards:resend", params={"state": "failed", "destination": "pacs"})
    assert resent.json()["resent"] == 2
    assert client.post("/forwards:resend", params={"state": "sent"}).status_code == 422
    audit = client.get("/audit", params={"entity": "forward"}).json()["items"]
    assert audit[0]["after"] == {"state": "queued", "count": 2}
    assert audit[0]["reason"] == "all failed of pacs"
    _until(lambda: _states(client) == ["failed", "failed"])  # still rejected: failed again


def test_a_viewer_lists_but_may_not_resend(
    app: Any, state: Runtime, make_key: Callable[..., str]
) -> None:
    with TestClient(app, headers={"Authorization": f"Bearer {make_key_viewer(make_key)}"}) as c:
        assert c.get("/forwards").json() == {"items": [], "total": 0, "limit": 100, "offset": 0}
        assert c.post("/forwards:resend").status_code == 403


def make_key_viewer(make_key: Callable[..., str]) -> str:
    from services.core.auth import Role

    return make_key(Role.VIEWER)


def test_forward_result_records_once_per_job_and_never_raises(
    client: TestClient, state: Runtime, mg_study: str, pacs: Callable[..., Pacs]
) -> None:
    """What a job calls: an unknown destination is reported, not raised; a job run again does
    not send twice; nothing asked, nothing recorded."""
    peer = pacs([])
    _register(state, peer.port)
    objects = [(o.sop_instance_uid, "result") for o in _objects(state, mg_study)]
    ctx = state.job_context
    first = forwards.forward_result(ctx, "job-1", mg_study, objects, ["pacs", "nowhere"])
    assert first is not None
    asked, unknown = first["destinations"]
    assert (asked["destination"], asked["objects"], len(asked["forward_ids"])) == ("pacs", 2, 2)
    assert unknown == {
        "destination": "nowhere",
        "objects": 2,
        "error": "no destination 'nowhere' (see GET /destinations)",
    }
    again = forwards.forward_result(ctx, "job-1", mg_study, objects, ["PACS"])
    assert again is not None and again["destinations"][0]["forward_ids"] == asked["forward_ids"]
    assert forwards.forward_result(ctx, "job-1", mg_study, [], ["pacs"]) is None
    assert forwards.forward_result(ctx, "job-1", mg_study, objects) is None  # no defaults
    _until(lambda: _states(client) == ["sent", "sent"])
    assert len(peer.received) == 2
    assert {i["job_id"] for i in client.get("/forwards").json()["items"]} == {"job-1"}


def test_a_broker_that_refuses_leaves_rows_queued_for_housekeeping(
    client: TestClient,
    state: Runtime,
    mg_study: str,
    pacs: Callable[..., Pacs],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker is down when a job forwards (a real refused connection): the rows stay
    queued and the job goes on; the next housekeeping pass hands them to a working queue."""
    from services.runtime.queue import producer_queue

    peer = pacs([])
    _register(state, peer.port)
    down = producer_queue(state.settings.model_copy(update={"broker_url": _dead_broker()}))
    assert down is not None
    try:
        rows = forwards.request(state.sessions, down, "pacs", _objects(state, mg_study), "t")
    finally:
        down.close()
    assert {r.state for r in rows} == {"queued"}
    assert "forward task not queued (ConnectionError); housekeeping sends it" in caplog.text
    _until(lambda: _states(client) == ["sent", "sent"])  # serve's housekeeping pass
    assert {str(ds.SOPInstanceUID) for ds in peer.received} == {r.sop_instance_uid for r in rows}


def _dead_broker() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_the_forward_to_shortcut_is_kept_in_the_registry(
    client: TestClient, state: Runtime
) -> None:
    """CRGATE_FORWARD_TO becomes the destination forward-to, follows a changed setting (audited
    as the system's), and a PACS registered by hand under that AE title is used as it is."""
    ensure = forwards.ensure_destination
    assert ensure(state.sessions, "PACS", "127.0.0.1", 104) == "forward-to"
    assert ensure(state.sessions, "PACS", "127.0.0.1", 104) == "forward-to"  # no change
    assert ensure(state.sessions, "PACS", "pacs.local", 11112) == "forward-to"
    (row,) = client.get("/destinations").json()
    assert (row["name"], row["host"], row["port"]) == ("forward-to", "pacs.local", 11112)
    audit = client.get("/audit", params={"entity": "destination"}).json()["items"]
    assert [(a["action"], a["actor"]) for a in audit] == [
        ("update", "system"),
        ("create", "system"),
    ]
    with state.sessions() as session, session.begin():
        create_destination(
            session, DestinationSpec("by hand", "ARCHIVE", "10.0.0.9", 104), actor="admin"
        )
    assert ensure(state.sessions, "ARCHIVE", "10.0.0.9", 104, name="other") == "by hand"
