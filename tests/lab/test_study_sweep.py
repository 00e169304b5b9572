"""The sweep's parts: the copy cache, CR lists, model resolution, settings, and resuming a sweep
(finished CRs reused, interrupted ones served from the cache) on tiny phantoms with the shipped
model, in this process (one worker)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from services.core.config import get_settings
from services.core.errors import InvalidInput, InvalidParameter, NotFound
from services.core.inference.card import load_card
from services.core.inference.runtime import Classifier
from services.lab.phantom import PhantomConfig, write_studies
from services.lab.safety.copies import CopyCache, encoder_tag
from services.lab.safety.labels import LabelledSet, load_labelled_set
from services.lab.safety.sweep import (
    SafetyStudyConfig,
    parse_crs,
    partial_path,
    resolve_model,
    run_sweep,
    threshold_of,
)

TINY = PhantomConfig(width=128, height=160)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> LabelledSet:
    out = tmp_path_factory.mktemp("study-sweep")
    write_studies(out, 3, seed=11, config=TINY)
    return load_labelled_set(out)


@pytest.fixture(scope="module")
def card_path() -> Path:
    settings = get_settings()
    return resolve_model(settings.default_model, settings.models_dir)


# ---------------------------------------------------------------------- copy cache


def test_copy_cache_misses_then_hits_by_content(labelled: LabelledSet, tmp_path: Path) -> None:
    cache = CopyCache(tmp_path / "cache")
    file = labelled.breasts[0].views["CC"]
    first = cache.view(file, 50)
    assert not first.cached
    assert 40 < first.quality.achieved_cr < 60 and first.quality.ssim is not None
    again = cache.view(file, 50)
    assert again.cached and again.quality == first.quality
    np.testing.assert_array_equal(again.pixels, first.pixels)
    moved = tmp_path / "elsewhere.dcm"  # same bytes elsewhere: the same copy
    shutil.copyfile(file, moved)
    assert cache.view(moved, 50).cached
    original = cache.view(file, 1)
    assert original.quality.psnr_db == 100.0 and original.quality.ssim == 1.0
    assert original.quality.achieved_cr == 1.0


def test_damaged_entry_is_a_miss(labelled: LabelledSet, tmp_path: Path) -> None:
    cache = CopyCache(tmp_path / "cache")
    file = labelled.breasts[0].views["MLO"]
    first = cache.view(file, 100)
    entry = next((tmp_path / "cache").rglob("*.npz"))
    entry.write_bytes(b"not an npz")
    second = cache.view(file, 100)
    assert not second.cached and second.quality == first.quality
    assert cache.view(file, 100).cached


def test_encoder_tags() -> None:
    quick, gateway = encoder_tag("quick"), encoder_tag("gateway")
    assert quick != gateway and "ojp" in quick
    with pytest.raises(InvalidParameter, match="encoder 'fast'"):
        encoder_tag("fast")


# ---------------------------------------------------------------------- inputs


def test_parse_crs() -> None:
    assert parse_crs("25, 1,25,100") == ((1.0, 25.0, 100.0), [])
    crs, notes = parse_crs("100,25")
    assert crs == (1.0, 25.0, 100.0) and "CR 1" in notes[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,25", "'0' is out of range"),
        ("1,-5", "'-5' is out of range"),
        ("1,nan", "'nan' is out of range"),
        ("1,0.5", "'0.5' is out of range"),
        ("1,abc", "'abc' is not a number"),
        ("1,,25", "empty entry"),
        ("", "empty"),
    ],
)
def test_bad_cr_lists(text: str, message: str) -> None:
    with pytest.raises(InvalidParameter, match=message):
        parse_crs(text)


def test_resolve_model(card_path: Path, tmp_path: Path) -> None:
    models = card_path.parent
    assert resolve_model(card_path.stem, models) == card_path
    assert resolve_model(str(card_path), tmp_path) == card_path
    onnx = tmp_path / "mine.onnx"
    shutil.copyfile(models / load_card(card_path).file, onnx)
    with pytest.raises(InvalidInput, match=r"mine\.onnx has no card \(mine\.json"):
        resolve_model(str(onnx), models)
    with pytest.raises(InvalidInput, match=r"model mine .* has no card"):
        resolve_model("mine", tmp_path)
    with pytest.raises(NotFound, match=r"no model 'absent'.*choose one of"):
        resolve_model("absent", models)
    with pytest.raises(NotFound, match=r"card .*absent\.json not found"):
        resolve_model(str(tmp_path / "absent.json"), models)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bootstrap": 10}, "at least 100"),
        ({"margin": 0.0}, "margin 0.0"),
        ({"margin": 0.6}, "margin 0.6"),
        ({"threshold": 1.5}, "threshold 1.5"),
        ({"encoder": "x"}, "encoder 'x'"),
        ({"workers": -1}, "workers -1"),
        ({"crs": (25.0,)}, "include 1"),
    ],
)
def test_config_checks(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidParameter, match=message):
        SafetyStudyConfig(**kwargs)  # type: ignore[arg-type]


def test_threshold_source(card_path: Path) -> None:
    card = load_card(card_path)
    assert threshold_of(card, 0.3) == (0.3, "given")
    explicit = "operating_threshold" in card.model_fields_set
    value, source = threshold_of(card, None)
    assert value == card.operating_threshold
    assert source == ("card" if explicit else "default (the card names none)")
    bare = card.model_copy(update={})
    bare.model_fields_set.discard("operating_threshold")
    assert threshold_of(bare, None) == (0.5, "default (the card names none)")


# ---------------------------------------------------------------------- resume


def test_sweep_resumes(labelled: LabelledSet, card_path: Path, tmp_path: Path) -> None:
    classifier = Classifier.load(card_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    views = labelled.n_views
    first = run_sweep(
        labelled, classifier, SafetyStudyConfig(crs=(1.0, 50.0), workers=1), out, cache
    )
    assert (first.computed, first.reused) == ([1.0, 50.0], [])
    assert (first.cache_hits, first.cache_misses) == (0, views)
    stamps = {cr: partial_path(out, cr).stat().st_mtime_ns for cr in (1.0, 50.0)}

    # a longer list: the finished CRs are read back, only the new one is computed
    second = run_sweep(
        labelled, classifier, SafetyStudyConfig(crs=(1.0, 50.0, 200.0), workers=1), out, cache
    )
    assert (second.computed, second.reused) == ([200.0], [1.0, 50.0])
    assert {cr: partial_path(out, cr).stat().st_mtime_ns for cr in (1.0, 50.0)} == stamps
    assert second.results[50.0].probabilities == first.results[50.0].probabilities

    # a CR interrupted before its partial result was written: inference again, copies cached
    partial_path(out, 50.0).unlink()
    third = run_sweep(
        labelled, classifier, SafetyStudyConfig(crs=(1.0, 50.0, 200.0), workers=1), out, cache
    )
    assert (third.computed, third.reused) == ([50.0], [1.0, 200.0])
    assert (third.cache_hits, third.cache_misses) == (views, 0)
    assert third.results[50.0].probabilities == first.results[50.0].probabilities

    # another encoder is another experiment: nothing is reused
    fourth = run_sweep(
        labelled,
        classifier,
        SafetyStudyConfig(crs=(1.0, 50.0), workers=1, encoder="gateway"),
        out,
        cache,
    )
    assert (fourth.computed, fourth.reused) == ([1.0, 50.0], [])
    assert fourth.cache_misses == views
