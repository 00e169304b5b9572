"""Arrival counting under parallel ingest (several associations or STOW requests at once)."""

from __future__ import annotations

import threading

from sqlalchemy.orm import Session, sessionmaker

from services.core.arrivals import record_arrival
from services.core.db.tables import StudyArrival


def test_parallel_arrivals_of_a_new_study_are_all_counted(
    sessions: sessionmaker[Session],
) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def arrive() -> None:
        try:
            barrier.wait()
            record_arrival(sessions, "1.2.3.4")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=arrive) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sessions() as session:
        row = session.get(StudyArrival, "1.2.3.4")
        assert row is not None and row.instance_count == 8 and row.classified_count == 0
