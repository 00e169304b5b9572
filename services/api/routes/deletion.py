"""Deleting a result crgate made (admin): its row, files, and the DICOM objects it stored."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from services.api.deps import StateDep
from services.api.dicomweb.delete import AdminDep, actor_of
from services.core import deletion

router = APIRouter(tags=["classification"])


@router.delete(
    "/studies/{study_uid}/results/{result_id}",
    summary="Delete a result: its row, overlay files, derived series, overlay captures and SR",
    responses={404: {"description": "no such result for the study"}},
)
def delete_result(
    study_uid: str, result_id: str, state: StateDep, principal: AdminDep
) -> dict[str, Any]:
    done = deletion.delete_result(
        state.sessions, state.store, result_id, study_uid=study_uid, actor=actor_of(principal)
    )
    return done.as_dict()
