"""DICOMweb (PS3.18) under /dicomweb: STOW-RS, QIDO-RS, WADO-RS, and DELETE (admin)."""

from fastapi import APIRouter

router = APIRouter(tags=["dicomweb"])

from services.api.dicomweb import qido, stow  # noqa: E402

router.include_router(stow.router)
router.include_router(qido.router)

from services.api.dicomweb import wado  # noqa: E402

router.include_router(wado.router)

from services.api.dicomweb import delete  # noqa: E402

router.include_router(delete.router)
