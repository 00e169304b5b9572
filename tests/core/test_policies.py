"""CR policies on a real index (SQLite and PostgreSQL): resolution, presets, ceilings, audit."""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

import services.core
from services.core import policies
from services.core.config import Settings
from services.core.db.tables import AuditEntry, Policy
from services.core.dicom.terms import BODY_PARTS, MODALITIES
from services.core.errors import Conflict, InvalidParameter, NotFound
from services.core.policies import (
    Ceiling,
    OverrideRequired,
    PolicyKey,
    PolicySpec,
    apply_preset,
    ceiling,
    create_policy,
    resolve_policy,
)

CSV_PATH = Path(services.core.__file__).parent / "data" / "cr-guidelines.csv"
ACTOR = "tester"


def csv_rows(preset: str) -> list[dict[str, str]]:
    with CSV_PATH.open(newline="") as fh:
        return [row for row in csv.DictReader(fh) if row["preset"] == preset]


def audit_count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(AuditEntry)) or 0)


def add(
    session: Session,
    modality: str,
    body_part: str | None = None,
    pediatric: bool | None = None,
    cr: float = 10,
    **kwargs: object,
) -> Policy:
    spec = PolicySpec(key=PolicyKey.of(modality, body_part, pediatric), cr=cr, **kwargs)  # type: ignore[arg-type]
    return create_policy(session, spec, actor=ACTOR)


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction per test, rolled back at the end, with the default policy (CR 25)."""
    with sessions() as s, s.begin():
        policies.ensure_default_policy(s, Settings(default_cr=25))
        yield s
        s.rollback()


# --------------------------------------------------------------------------- default policy


def test_default_policy_is_created_once_from_settings(sessions: sessionmaker[Session]) -> None:
    for _ in range(2):
        with sessions.begin() as s:
            row = policies.ensure_default_policy(s, Settings(default_cr=12))
            assert (row.modality, row.body_part, row.pediatric) == ("*", "*", "*")
            assert (row.cr, row.syntax) == (12, "j2k")
    with sessions() as s:
        assert len(policies.list_policies(s)) == 1
        (entry,) = s.scalars(select(AuditEntry)).all()
        assert (entry.actor, entry.action, entry.entity) == ("system", "create", "policy")
        assert entry.before is None and entry.after["cr"] == 12


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_processes_starting_at_once_make_one_default(
    sessions: sessionmaker[Session], engine: Engine
) -> None:
    """The second start's insert waits on the first's uncommitted row, then takes it."""
    found: dict[str, int | BaseException] = {}

    def second_start() -> None:
        try:
            with sessions.begin() as s:
                found["id"] = policies.ensure_default_policy(s, Settings(default_cr=30)).id
        except BaseException as exc:  # reported by the assertions below
            found["error"] = exc

    with sessions() as first, first.begin():
        mine = policies.ensure_default_policy(first, Settings(default_cr=20))
        thread = threading.Thread(target=second_start)
        thread.start()
        with engine.connect() as conn:  # wait until the second insert blocks on our row
            waiting = text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            for _ in range(500):
                blocked = conn.execute(waiting).scalar()
                conn.rollback()  # pg_stat_activity is a snapshot per transaction
                if blocked or "error" in found:
                    break
                time.sleep(0.02)
            else:
                raise AssertionError("the second start never waited on the first")
    thread.join(30)
    assert "error" not in found, found
    assert found["id"] == mine.id
    with sessions() as s:
        (row,) = policies.list_policies(s)
        assert row.cr == 20
        assert len(s.scalars(select(AuditEntry)).all()) == 1


def test_default_cr_1_gives_a_lossless_default(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        row = policies.ensure_default_policy(s, Settings(default_cr=1))
        assert row.syntax == "j2k-lossless"


# --------------------------------------------------------------------------- resolution


@pytest.fixture
def policy_set(session: Session) -> dict[str, int]:
    """default 25, MG 15, MG/BREAST 20, MG/BREAST pediatric 8, MG/BREAST adult 12,
    MG pediatric 5, CT adult 9."""
    ids = {"default": policies.find_policy(session, policies.DEFAULT_KEY).id}  # type: ignore[union-attr]
    ids["MG"] = add(session, "MG", cr=15).id
    ids["MG/BREAST"] = add(session, "MG", "BREAST", cr=20).id
    ids["MG/BREAST/yes"] = add(session, "MG", "BREAST", True, cr=8).id
    ids["MG/BREAST/no"] = add(session, "MG", "BREAST", False, cr=12).id
    ids["MG/*/yes"] = add(session, "MG", None, True, cr=5).id
    ids["CT/*/no"] = add(session, "CT", None, False, cr=9).id
    return ids


@pytest.mark.parametrize(
    ("modality", "body_part", "pediatric", "expected"),
    [
        ("CT", "HEAD", True, "default"),  # CT adult only: a child's CT falls to the default
        ("CT", "HEAD", False, "CT/*/no"),
        ("CT", None, None, "CT/*/no"),  # unknown age matches an age-specific policy
        ("US", "ABDOMEN", None, "default"),
        (None, None, None, "default"),
        ("MG", None, False, "MG"),
        ("MG", "CHEST", False, "MG"),  # the body part does not match MG/BREAST
        ("MG", "CHEST", True, "MG/*/yes"),
        ("MG", "BREAST", True, "MG/BREAST/yes"),  # exact
        ("MG", "breast ", False, "MG/BREAST/no"),  # case-insensitive, trimmed
        ("MG", "BREAST", None, "MG/BREAST/yes"),  # unknown age: lowest CR of the equals (8)
        ("SR\\MG", "BREAST", False, "MG/BREAST/no"),  # multi-valued modality
        (["OT", "MG"], "BREAST", False, "MG/BREAST/no"),
    ],
)
def test_most_specific_policy_wins(
    session: Session,
    policy_set: dict[str, int],
    modality: str | list[str] | None,
    body_part: str | None,
    pediatric: bool | None,
    expected: str,
) -> None:
    found = resolve_policy(session, modality=modality, body_part=body_part, pediatric=pediatric)
    assert found.policy_id == policy_set[expected] == found.id


def test_body_part_beats_pediatric(session: Session) -> None:
    """Specificity order: modality, then body part, then pediatric."""
    breast = add(session, "MG", "BREAST", cr=20)
    add(session, "MG", None, True, cr=5)
    found = resolve_policy(session, modality="MG", body_part="BREAST", pediatric=True)
    assert found.policy_id == breast.id


def test_resolved_policy_carries_values_and_source(session: Session) -> None:
    apply_preset(session, "RCR", actor=ACTOR)
    found = resolve_policy(session, modality="MG", body_part="BREAST", pediatric=None)
    assert (found.cr, found.syntax, found.expected_instances) == (20, "j2k", 4)
    assert (found.preset, found.max_cr, found.quiet_seconds) == ("RCR", 20, 120)
    assert found.source == f"policy {found.policy_id} (MG/BREAST, preset RCR)"
    default = resolve_policy(session, modality="XA", body_part=None, pediatric=None)
    assert default.source == f"policy {default.policy_id} (default)"
    assert default.cr == 25 and default.output_syntax.value == "j2k"
    child = add(session, "CT", None, True, cr=3)
    found = resolve_policy(session, modality="CT", body_part="HEAD", pediatric=True)
    assert found.source == f"policy {child.id} (CT/*/pediatric)"


def test_no_policy_at_all_is_reported(sessions: sessionmaker[Session]) -> None:
    with sessions() as s, pytest.raises(NotFound, match="default policy is missing"):
        resolve_policy(s, modality="MG", body_part=None, pediatric=None)


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", ["CAR", "DRG", "RCR"])
def test_preset_sets_one_policy_per_modality_and_body_part_from_the_csv(
    session: Session, name: str
) -> None:
    result = apply_preset(session, name.lower(), actor=ACTOR)
    assert result.preset == name and not result.updated and not result.unchanged
    expected = 0
    for row in csv_rows(name):
        for modality in row["modality"].split():
            for part in row["body_part"].split():
                expected += 1
                p = policies.find_policy(session, PolicyKey(modality, part, row["pediatric"]))
                assert p is not None, (name, modality, part)
                assert p.cr == p.max_cr == float(row["max_cr"])
                assert (p.preset, p.syntax, p.auto_classify, p.quiet_seconds) == (
                    name,
                    "j2k",
                    False,
                    120,
                )
                assert p.expected_instances == (4 if modality == "MG" else None)
    assert len(result.created) == expected
    assert len(policies.list_policies(session)) == expected + 1  # and the default
    entries = session.scalars(select(AuditEntry).where(AuditEntry.actor == ACTOR)).all()
    assert len(entries) == expected
    assert {(e.action, e.reason) for e in entries} == {("create", f"preset {name} applied")}


def test_cr_dx_row_expands_to_one_policy_per_modality_for_any_body_part(
    session: Session,
) -> None:
    apply_preset(session, "RCR", actor=ACTOR)
    keys = {
        (p.modality, p.body_part, p.pediatric)
        for p in policies.list_policies(session)
        if p.modality in ("CR", "DX")
    }
    assert keys == {("CR", "*", "no"), ("DX", "*", "no")}


def test_every_preset_term_is_a_dicom_defined_term() -> None:
    rows = [row for name in ("CAR", "DRG", "RCR") for row in csv_rows(name)]
    assert len(rows) == 23
    for row in rows:
        for modality in row["modality"].split():
            assert modality in MODALITIES, row
        for part in row["body_part"].split():
            assert part == "*" or part in BODY_PARTS, row


def test_applying_a_preset_twice_changes_nothing(session: Session) -> None:
    first = apply_preset(session, "CAR", actor=ACTOR)
    before = [policies.snapshot(p) for p in policies.list_policies(session)]
    logged = audit_count(session)
    second = apply_preset(session, "CAR", actor=ACTOR)
    assert not second.created and not second.updated
    assert sorted(second.unchanged) == sorted(first.created)
    assert [policies.snapshot(p) for p in policies.list_policies(session)] == before
    assert audit_count(session) == logged


def test_preset_keeps_readiness_settings_and_logs_the_change(session: Session) -> None:
    mine = add(
        session, "MG", "BREAST", cr=30, auto_classify=True, expected_instances=2, quiet_seconds=60
    )
    result = apply_preset(session, "CAR", actor=ACTOR)
    assert mine.id in result.updated
    session.refresh(mine)
    assert (mine.cr, mine.max_cr, mine.preset) == (25, 25, "CAR")  # above the maximum: lowered
    assert (mine.auto_classify, mine.expected_instances, mine.quiet_seconds) == (True, 2, 60)
    entry = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.entity_id == str(mine.id))
        .order_by(AuditEntry.id.desc())
    ).first()
    assert entry is not None and entry.action == "update"
    assert entry.before["cr"] == 30 and entry.after["cr"] == 25
    assert entry.after["preset"] == "CAR" and entry.reason == "preset CAR applied"


def test_a_preset_never_raises_a_stricter_hand_set_value_unless_forced(session: Session) -> None:
    """Found as an admin would: a pediatric CR/DX policy set by hand to 8 became 30."""
    child = add(session, "CR", None, True, cr=8, syntax="htj2k")
    result = apply_preset(session, "CAR", actor=ACTOR)
    session.refresh(child)
    assert (child.cr, child.syntax, child.max_cr, child.preset) == (8, "htj2k", 30, "CAR")
    (skipped,) = [s for s in result.skipped if s.policy_id == child.id]
    assert (skipped.cr, skipped.preset_cr) == (8, 30)
    assert "kept the stricter CR 8" in skipped.reason and "force" in skipped.reason
    forced = apply_preset(session, "CAR", actor=ACTOR, force=True)
    session.refresh(child)
    assert (child.cr, child.syntax) == (30, "htj2k")  # raised, in the same family
    assert child.id in forced.updated and not forced.skipped
    entry = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.entity_id == str(child.id))
        .order_by(AuditEntry.id.desc())
    ).first()
    assert entry is not None and entry.reason == "preset CAR applied with force"


def test_policies_above_a_later_ceiling_are_listed_until_lowered_or_given_a_reason(
    session: Session,
) -> None:
    """Found as an admin would: a later preset left older policies above its ceiling with no
    flag. MG/* at 40 by hand, then RCR's MG/BREAST maximum 20 becomes the modality's ceiling."""
    loose = add(session, "MG", None, None, cr=40)
    assert policies.violations(session) == []  # no ceiling yet
    apply_preset(session, "RCR", actor=ACTOR)
    (found,) = [v for v in policies.violations(session) if v.policy_id == loose.id]
    assert (found.cr, found.max_cr, found.preset) == (40, 20, "RCR")
    assert "above the maximum 20 of preset RCR" in found.message
    policies.update_policy(session, loose.id, {}, actor=ACTOR, override_reason="research arm")
    assert all(v.policy_id != loose.id for v in policies.violations(session))
    policies.update_policy(session, loose.id, {"cr": 15}, actor=ACTOR)
    session.refresh(loose)
    assert loose.override_reason is None and policies.violation_of(session, loose) is None


def test_a_later_preset_replaces_values_and_maximum(session: Session) -> None:
    apply_preset(session, "CAR", actor=ACTOR)
    result = apply_preset(session, "DRG", actor=ACTOR)
    mg = policies.find_policy(session, PolicyKey("MG", "BREAST", "*"))
    assert mg is not None and mg.id in result.updated
    assert (mg.cr, mg.max_cr, mg.preset) == (15, 15, "DRG")
    nm = policies.find_policy(session, PolicyKey("NM", "*", "*"))  # DRG has no NM row
    assert nm is not None and (nm.cr, nm.preset) == (11, "CAR")


def test_unknown_preset_lists_the_names(session: Session) -> None:
    with pytest.raises(NotFound, match="choose one of CAR, DRG, RCR"):
        apply_preset(session, "ACR", actor=ACTOR)


def test_parse_presets_validates_rows() -> None:
    header = "preset,modality,body_part,pediatric,max_cr,note\n"
    parsed = policies.parse_presets(header + "X,CR DX,CHEST SKULL,no,10,n\nX,CR,chest,no,8,m\n")
    assert parsed["X"].targets()[PolicyKey("CR", "CHEST", "no")] == 8  # overlap: the lower
    assert len(parsed["X"].targets()) == 4
    with pytest.raises(InvalidParameter, match="line 2"):
        policies.parse_presets(header + "X,CR,CHEST,maybe,10,n\n")
    with pytest.raises(InvalidParameter, match="line 2: body part 'SKELETAL' is not a Body Part"):
        policies.parse_presets(header + "X,CR,SKELETAL,no,10,n\n")
    with pytest.raises(InvalidParameter, match="line 2: modality 'CXR' is not a Modality"):
        policies.parse_presets(header + "X,CXR,CHEST,no,10,n\n")
    with pytest.raises(InvalidParameter, match="line 3"):
        policies.parse_presets(header + "X,CR,CHEST,no,10,n\nX,CR,CHEST,no,0,n\n")


# --------------------------------------------------------------------------- ceilings


def test_cr_above_the_preset_maximum_needs_a_reason(session: Session) -> None:
    apply_preset(session, "RCR", actor=ACTOR)
    mg = policies.find_policy(session, PolicyKey("MG", "BREAST", "*"))
    assert mg is not None
    with pytest.raises(OverrideRequired, match="above the maximum 20 set by preset RCR") as caught:
        policies.update_policy(session, mg.id, {"cr": 25}, actor=ACTOR, override_reason="  ")
    assert (caught.value.max_cr, caught.value.preset, caught.value.cr) == (20, "RCR", 25)
    session.refresh(mg)
    assert mg.cr == 20
    policies.update_policy(
        session, mg.id, {"cr": 25}, actor=ACTOR, override_reason="screening study 2026"
    )
    assert (mg.cr, mg.override_reason) == (25, "screening study 2026")
    entry = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())).first()
    assert entry is not None and entry.reason == "screening study 2026"
    assert policies.source_of(mg) == f"policy {mg.id} (MG/BREAST, preset RCR, override)"
    policies.update_policy(session, mg.id, {"quiet_seconds": 30}, actor=ACTOR)
    assert mg.override_reason == "screening study 2026"  # an unrelated edit keeps the reason
    lowered = policies.update_policy(session, mg.id, {"cr": 18}, actor=ACTOR)
    assert (lowered.cr, lowered.override_reason) == (18, None)
    policies.update_policy(session, mg.id, {"cr": 20}, actor=ACTOR)  # at the maximum: fine


def test_new_policies_inherit_the_maximum_of_the_modality(session: Session) -> None:
    apply_preset(session, "RCR", actor=ACTOR)
    with pytest.raises(OverrideRequired, match=r"MG/\*/pediatric .* 20 set by preset RCR"):
        add(session, "MG", None, True, cr=30)
    assert ceiling(session, PolicyKey("CT", "*", "*")) == Ceiling(5, "RCR")
    assert ceiling(session, PolicyKey("NM", "*", "*")) is None  # RCR has no NM row
    assert ceiling(session, policies.DEFAULT_KEY) is None
    nm = add(session, "NM", cr=40)
    assert nm.override_reason is None
    child = add(session, "MG", None, True, cr=30, override_reason="pediatric research")
    assert child.override_reason == "pediatric research"


def test_the_last_applied_preset_sets_the_inherited_maximum(session: Session) -> None:
    apply_preset(session, "RCR", actor=ACTOR)
    # RCR: CT HEAD, BRAIN, CHEST, LUNG, the spine and EXTREMITY at 5; no PELVIS row: the lowest
    assert ceiling(session, PolicyKey("CT", "PELVIS", "*")) == Ceiling(5, "RCR")
    apply_preset(session, "DRG", actor=ACTOR)
    # DRG (applied last): CT HEAD/BRAIN 5 and ABDOMEN/PELVIS/ABDOMENPELVIS 15
    assert ceiling(session, PolicyKey("CT", "PELVIS", "*")) == Ceiling(15, "DRG")
    assert ceiling(session, PolicyKey("CT", "*", "*")) == Ceiling(5, "DRG")


# --------------------------------------------------------------------------- changes


def test_duplicate_key_is_a_conflict(session: Session) -> None:
    first = add(session, "mg", "Breast", cr=10)
    with pytest.raises(Conflict, match=f"MG/BREAST exists already \\(policy {first.id}\\)"):
        add(session, "MG", "BREAST", cr=12)
    with pytest.raises(Conflict, match="default exists already"):
        add(session, "*", cr=3)


def test_default_policy_cannot_be_deleted(session: Session) -> None:
    default = policies.find_policy(session, policies.DEFAULT_KEY)
    assert default is not None
    with pytest.raises(Conflict, match="cannot be deleted"):
        policies.delete_policy(session, default.id, actor=ACTOR)


def test_delete_is_logged_with_the_old_values(session: Session) -> None:
    row = add(session, "US", cr=11)
    policies.delete_policy(session, row.id, actor=ACTOR, reason="no US here")
    assert session.get(Policy, row.id) is None
    entry = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())).first()
    assert entry is not None
    assert (entry.action, entry.entity_id, entry.after, entry.reason) == (
        "delete",
        str(row.id),
        None,
        "no US here",
    )
    assert entry.before["modality"] == "US" and entry.before["cr"] == 11
    with pytest.raises(NotFound, match=f"no policy with id {row.id}"):
        policies.delete_policy(session, row.id, actor=ACTOR)


def test_update_that_changes_nothing_is_not_logged(session: Session) -> None:
    row = add(session, "US", cr=11, quiet_seconds=60)
    logged = audit_count(session)
    policies.update_policy(session, row.id, {"cr": 11, "quiet_seconds": 60}, actor=ACTOR)
    assert audit_count(session) == logged
    policies.update_policy(session, row.id, {"cr": 1}, actor=ACTOR)
    assert (row.cr, row.syntax) == (1, "j2k-lossless")  # the syntax follows the CR
    assert audit_count(session) == logged + 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "CR DX"}, "not a DICOM code"),
        ({"body_part": "CHEST/LUNG"}, "not a DICOM code"),
        (
            {"modality": "SC"},
            r"'SC' is not a Modality defined term of DICOM PS3\.3 C\.7\.3\.1\.1\.1",
        ),
        (
            {"body_part": "skeleton"},
            r"'SKELETON' is not a Body Part Examined defined term .*CID 4031",
        ),
        ({"pediatric": "maybe"}, "use yes, no"),
        ({"cr": 0}, "out of range"),
        ({"cr": float("nan")}, "out of range"),
        ({"cr": 20, "syntax": "j2k-lossless"}, "j2k-lossless is lossless and cannot give CR 20"),
        ({"cr": 1, "syntax": "j2k"}, "CR 1 means lossless"),
        ({"syntax": "jpeg"}, "unknown syntax"),
        ({"expected_instances": 0}, "expected instances 0"),
        ({"quiet_seconds": -1}, "quiet seconds -1"),
    ],
)
def test_invalid_values_are_refused(
    session: Session, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"modality": "US", "cr": 10} | kwargs
    with pytest.raises(InvalidParameter, match=message):
        add(session, **args)  # type: ignore[arg-type]
    assert policies.find_policy(session, PolicyKey("US")) is None


def test_set_policy_creates_then_updates(session: Session) -> None:
    key = PolicyKey.of("mg", "breast", "yes")
    with pytest.raises(InvalidParameter, match="needs a CR"):
        policies.set_policy(session, key, {"auto_classify": True}, actor=ACTOR)
    row, created = policies.set_policy(session, key, {"cr": 9}, actor=ACTOR)
    assert created and (row.cr, row.pediatric, row.expected_instances) == (9, "yes", None)
    again, created = policies.set_policy(
        session, key, {"auto_classify": True, "expected_instances": 4}, actor=ACTOR
    )
    assert not created and again.id == row.id
    assert (again.cr, again.auto_classify, again.expected_instances) == (9, True, 4)


# --------------------------------------------------------------------------- defined terms


def test_defined_terms_are_accepted_in_any_case(session: Session) -> None:
    assert PolicyKey.of_row(add(session, "ct", "lspine")).label == "CT/LSPINE"
    assert PolicyKey.of_row(add(session, "Rtstruct", "HeadNeck")).label == "RTSTRUCT/HEADNECK"
    assert PolicyKey.of_row(add(session, "ST", "*")).label == "ST/*"  # a retired modality term


def test_a_stored_policy_with_a_non_standard_term_still_loads_resolves_and_changes(
    session: Session,
) -> None:
    """Rows made before the check (e.g. by the old CR/SKELETAL preset row) stay usable."""
    now = policies._now()
    legacy = Policy(
        modality="CR",
        body_part="SKELETAL",
        pediatric="no",
        cr=10,
        syntax="j2k",
        auto_classify=False,
        quiet_seconds=120,
        created_at=now,
        updated_at=now,
    )
    session.add(legacy)
    session.flush()
    assert legacy in policies.list_policies(session)
    found = resolve_policy(session, modality="CR", body_part="skeletal", pediatric=False)
    assert (found.policy_id, found.source) == (legacy.id, f"policy {legacy.id} (CR/SKELETAL/adult)")
    policies.update_policy(session, legacy.id, {"cr": 8}, actor=ACTOR)
    key = PolicyKey.of("CR", "SKELETAL", "no")  # the key itself is only checked for its form
    row, created = policies.set_policy(session, key, {"cr": 7}, actor=ACTOR)
    assert (row.id, created, row.cr) == (legacy.id, False, 7)
    with pytest.raises(InvalidParameter, match="'SKELETAL' is not a Body Part Examined"):
        policies.set_policy(session, PolicyKey.of("DX", "SKELETAL", "no"), {"cr": 7}, actor=ACTOR)
    # studies are resolved whatever they carry
    other = resolve_policy(session, modality="XX", body_part="NOT A TERM", pediatric=None)
    assert (other.modality, other.body_part) == ("*", "*")
