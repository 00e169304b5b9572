"""DELETE of studies, series and instances under /dicomweb (admin; not in PS3.18, the paths are
the DICOMweb resources', as Orthanc and dcm4chee serve them).

The answer is ``200`` with what was deleted (counts, files not removed); core:
services/core/deletion.py (index rows first, committed, then the files).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from services.api.deps import StateDep, require
from services.api.dicomweb.endpoints import INSTANCE, SERIES, STUDY
from services.core import deletion
from services.core.auth import Principal, Role

router = APIRouter()
AdminDep = Annotated[Principal | None, Depends(require(Role.ADMIN))]
_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "a malformed UID"},
    404: {"description": "not stored here"},
}


def actor_of(principal: Principal | None) -> str:
    return principal.name if principal is not None else "unknown"


@router.delete(
    STUDY,
    summary="Delete a study: its instances (crgate's derived ones too), results and files",
    responses=_RESPONSES,
)
def delete_study(study: str, state: StateDep, principal: AdminDep) -> dict[str, Any]:
    done = deletion.delete_study(state.sessions, state.store, study, actor=actor_of(principal))
    return done.as_dict()


@router.delete(SERIES, summary="Delete a series and its files", responses=_RESPONSES)
def delete_series(study: str, series: str, state: StateDep, principal: AdminDep) -> dict[str, Any]:
    done = deletion.delete_series(
        state.sessions, state.store, study, series, actor=actor_of(principal)
    )
    return done.as_dict()


@router.delete(INSTANCE, summary="Delete an instance and its file", responses=_RESPONSES)
def delete_instance(
    study: str, series: str, sop: str, state: StateDep, principal: AdminDep
) -> dict[str, Any]:
    done = deletion.delete_instance(
        state.sessions, state.store, study, series, sop, actor=actor_of(principal)
    )
    return done.as_dict()
