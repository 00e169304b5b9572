"""GET /models: the installed models as the API sees them (the shipped ones by default), and
an installed model that classify's ``?model=`` can then name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.core.auth import Role, create_key
from services.core.config import Settings
from services.core.inference.card import load_card
from services.runtime import build_runtime

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_lists_the_shipped_models(client: TestClient) -> None:
    response = client.get("/models")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["default"] == "cnn3-phantom-v2"
    rows = {r["key"]: r for r in body["models"]}
    assert set(rows) >= {"cnn3-phantom-v2", "resnet18-phantom-v1"}
    cnn3 = rows["cnn3-phantom-v2"]
    card = load_card(MODELS / "cnn3-phantom-v2.json")
    assert cnn3["default"] is True and cnn3["sha256"] == card.sha256
    assert cnn3["saliency"] == "hirescam" and cnn3["probability_output"] == "malignancy"
    assert cnn3["views"] == "cc+mlo" and "not for clinical use" in cnn3["intended_use"]
    assert cnn3["auroc_cr1"] == pytest.approx(card.test_results[0].auroc.value)


def test_lists_its_own_folder_with_broken_cards(tmp_path: Path, database_url: str) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    for suffix in (".json", ".onnx"):
        shutil.copyfile(MODELS / f"cnn3-phantom-v2{suffix}", folder / f"cnn3-phantom-v2{suffix}")
    (folder / "broken.json").write_text("{not json")
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, models_dir=folder)
    state = build_runtime(settings, create=True)
    try:
        with TestClient(create_app(state=state)) as client:
            assert client.get("/models").status_code == 401  # a key is needed
            with state.sessions() as session, session.begin():
                _row, token = create_key(session, name="viewer", role=Role.VIEWER)
            response = client.get("/models", headers={"Authorization": f"Bearer {token}"})
    finally:
        state.close()
    assert response.status_code == 200, response.text
    rows = {r["key"]: r for r in response.json()["models"]}
    assert set(rows) == {"cnn3-phantom-v2", "broken"}
    assert "not readable JSON" in rows["broken"]["problem"] and rows["broken"]["default"] is False
