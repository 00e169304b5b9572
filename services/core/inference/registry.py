"""The models folder: which models are installed, one model's card, removing one.

A model is installed as ``<key>.json`` (its card) and the ONNX file the card names, side by side
in ``Settings.models_dir``; the key (the card's file stem, e.g. ``cnn3-phantom-v2``) is what
``?model=``, ``--model`` and ``Settings.default_model`` name. ``crgate model import`` installs
one (:mod:`services.core.inference.importer`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from services.core.errors import CrgateError, InvalidParameter, NotFound
from services.core.inference.card import ModelCard, load_card

KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_key(key: str, what: str = "model") -> str:
    """A model key is a plain file stem: letters, digits, '.', '_' and '-'."""
    if not KEY.match(key) or key.endswith(".json") or key.endswith(".onnx"):
        raise InvalidParameter(
            f"{what} {key!r}: use letters, digits, '.', '_' and '-' (at most 100, no path)"
        )
    return key


def find_card(models_dir: Path, key: str) -> Path:
    """The card of installed model ``key``; NotFound names the installed ones."""
    path = models_dir / f"{check_key(key)}.json"
    if not path.is_file():
        known = installed(models_dir)
        raise NotFound(f"no model {key!r} in {models_dir}; installed: {', '.join(known) or 'none'}")
    return path


def installed(models_dir: Path) -> list[str]:
    """The keys of every card in the folder, sorted."""
    return sorted(p.stem for p in models_dir.glob("*.json") if KEY.match(p.stem))


def summary(key: str, card: ModelCard, default: str | None = None) -> dict[str, Any]:
    """What a listing shows of one model."""
    cr1 = next((r for r in card.test_results if r.cr == 1), None)
    return {
        "key": key,
        "name": card.name,
        "version": card.version,
        "default": key == default,
        "file": card.file,
        "sha256": card.sha256,
        "architecture": card.architecture,
        "input_shape": card.input_shape,
        "views": card.preprocess.views,
        "probability_output": card.probability_output,
        "saliency": card.saliency,
        "operating_threshold": card.operating_threshold,
        "intended_use": card.intended_use,
        "imported": card.model_extra.get("imported") if card.model_extra else None,
        "auroc_cr1": None if cr1 is None else cr1.auroc.value,
    }


def list_models(models_dir: Path, default: str | None = None) -> list[dict[str, Any]]:
    """Every installed model's summary; a card that does not load is listed with its problem."""
    rows = []
    for key in installed(models_dir):
        try:
            rows.append(summary(key, load_card(models_dir / f"{key}.json"), default))
        except CrgateError as exc:
            rows.append({"key": key, "default": key == default, "problem": str(exc)})
    return rows


def remove(models_dir: Path, key: str, default: str | None = None) -> list[Path]:
    """Delete model ``key``'s card and ONNX file (not the default model); the paths removed."""
    card_path = find_card(models_dir, key)
    if key == default:
        raise InvalidParameter(
            f"model {key!r} is the default model (CRGATE_DEFAULT_MODEL): choose another "
            "default before removing it"
        )
    files = [card_path]
    try:
        onnx = models_dir / load_card(card_path).file
    except CrgateError:
        onnx = None
    if onnx is not None and onnx.parent == models_dir and onnx.is_file():
        files.insert(0, onnx)
    for path in files:
        path.unlink()
    return files
