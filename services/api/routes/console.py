"""The web console (``/ui``) and the JSON routes it needs that the API lacked: the job list,
API keys, the sweep list. One router, so the app registers the console in one line."""

from __future__ import annotations

from fastapi import APIRouter

from services.api.routes import jobs, keys
from services.api.ui import images, pages

router = APIRouter()
router.include_router(jobs.router)
router.include_router(keys.router)
router.include_router(images.router)
router.include_router(pages.router)
