"""The installed models: what ``?model=`` on a classification may name."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from services.api.deps import StateDep, require
from services.core.auth import Role
from services.core.inference.registry import list_models

router = APIRouter(tags=["models"])


@router.get(
    "/models",
    summary="The installed models (cards in the models folder), the default one marked",
    dependencies=[Depends(require(Role.VIEWER))],
)
def get_models(state: StateDep) -> dict[str, Any]:
    settings = state.settings
    return {
        "default": settings.default_model,
        "models": list_models(settings.models_dir, settings.default_model),
    }
