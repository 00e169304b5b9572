"""CR policies: the compression ratio (and syntax, auto-classification, readiness) a site applies
by modality, body part and pediatric; guideline presets; every change audit-logged.

Resolution: among the policies that match, the most specific wins: modality first, then body
part, then pediatric. When the caller does not know whether the patient is pediatric (None),
policies for either match but count as unspecific there; among equally specific matches the lowest
CR wins (the conservative choice). The default policy (``*``/``*``/``*``) matches everything.

Ceilings: a policy created or updated by a preset carries that preset's maximum (``max_cr``);
other policies of a modality inherit the maximum of the preset last applied to it. Setting a CR
above the ceiling needs an override reason, which is kept on the row and in the audit log.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import Any, TypedDict

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.core import audit
from services.core.codecs import OutputSyntax
from services.core.config import Settings
from services.core.db.tables import Destination, Policy
from services.core.dicom.terms import BODY_PARTS, MODALITIES, DefinedTerms
from services.core.errors import Conflict, InvalidParameter, NotFound
from services.core.ratio import validate_cr

ANY = "*"
ENTITY = "policy"  # the audit log's entity for these rows
DEFAULT_QUIET_SECONDS = 120
MAX_QUIET_SECONDS = 7 * 86400
MAX_EXPECTED_INSTANCES = 100_000
MG_SCREENING_VIEWS = 4  # a screening mammogram: CC and MLO of each breast
PRESETS_FILE = "cr-guidelines.csv"
CLASSIFIABLE_MODALITY = "MG"  # the modality the installed models read
FORWARDABLE = ("originals", "compressed", "results")  # what a forward action may send
DEFAULT_FORWARD_WHAT = ("compressed", "results")
_CODE = re.compile(r"^[A-Z0-9_]{1,16}$")  # a DICOM CS value without spaces
_PEDIATRIC = {"yes": "yes", "no": "no", "*": ANY, "any": ANY}


class OverrideRequired(InvalidParameter):
    """A CR above the policy's guideline maximum was set without a reason."""

    def __init__(self, message: str, *, cr: float, max_cr: float, preset: str) -> None:
        super().__init__(message)
        self.cr = cr
        self.max_cr = max_cr
        self.preset = preset

    @property
    def details(self) -> dict[str, Any]:
        return {"cr": self.cr, "max_cr": self.max_cr, "preset": self.preset}


def _now() -> datetime:
    return datetime.now(UTC)


def _code(value: str, what: str, terms: DefinedTerms | None = None) -> str:
    """``value`` upper-cased; with ``terms``, also refused when it is not one of them."""
    code = value.strip().upper()
    if code == ANY:
        return ANY
    if not _CODE.match(code):
        raise InvalidParameter(
            f"{what} {value!r} is not a DICOM code: use one word of up to 16 letters, digits "
            f"or underscores (like MG or BREAST), or {ANY} for any"
        )
    if terms is not None and code not in terms:
        raise InvalidParameter(terms.refusal(what, value))
    return code


def check_terms(key: PolicyKey) -> PolicyKey:
    """``key`` when its modality and body part are DICOM defined terms (or ``*``): what a new
    policy may name. Stored policies and the studies that are resolved are not checked."""
    _code(key.modality, "modality", MODALITIES)
    _code(key.body_part, "body part", BODY_PARTS)
    return key


def pediatric_value(value: bool | str | None) -> str:
    """The stored form: ``yes``, ``no`` or ``*`` (from a bool, None = any, or those words)."""
    if value is None:
        return ANY
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        return _PEDIATRIC[value.strip().lower()]
    except KeyError:
        raise InvalidParameter(f"pediatric {value!r}: use yes, no or {ANY} (any)") from None


def pediatric_flag(value: str) -> bool | None:
    return None if value == ANY else value == "yes"


@dataclass(frozen=True)
class PolicyKey:
    """What a policy applies to; one of each (``*`` = any). Normalised by :meth:`of`."""

    modality: str
    body_part: str = ANY
    pediatric: str = ANY

    @classmethod
    def of(
        cls, modality: str, body_part: str | None = None, pediatric: bool | str | None = None
    ) -> PolicyKey:
        return cls(
            _code(modality, "modality"),
            _code(body_part or ANY, "body part"),
            pediatric_value(pediatric),
        )

    @classmethod
    def of_row(cls, row: Policy) -> PolicyKey:
        return cls(row.modality, row.body_part, row.pediatric)

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_KEY

    @property
    def label(self) -> str:
        if self.is_default:
            return "default"
        text = f"{self.modality}/{self.body_part}"
        if self.pediatric != ANY:
            text += "/pediatric" if self.pediatric == "yes" else "/adult"
        return text


DEFAULT_KEY = PolicyKey(ANY, ANY, ANY)


@dataclass(frozen=True)
class PolicySpec:
    """A new policy. ``syntax`` None follows the CR (lossless for CR 1)."""

    key: PolicyKey
    cr: float
    syntax: str | None = None
    auto_classify: bool = False
    expected_instances: int | None = None
    quiet_seconds: int = DEFAULT_QUIET_SECONDS
    override_reason: str | None = None
    auto_compress: bool = False
    keep_copy: bool = True
    forward_to: list[str] | None = None
    forward_what: list[str] | None = None


class PolicyChanges(TypedDict, total=False):
    """Fields to change on an existing policy; those left out keep their values."""

    cr: float
    syntax: str | None
    auto_classify: bool
    expected_instances: int | None
    quiet_seconds: int
    auto_compress: bool
    keep_copy: bool
    forward_to: list[str] | None
    forward_what: list[str] | None


@dataclass(frozen=True)
class Ceiling:
    """A guideline maximum CR and the preset that set it."""

    max_cr: float
    preset: str


@dataclass(frozen=True)
class ResolvedPolicy:
    """The policy that applies to a study, with ``source`` naming it for job results."""

    policy_id: int
    modality: str
    body_part: str
    pediatric: str
    cr: float
    syntax: str
    auto_classify: bool
    expected_instances: int | None
    quiet_seconds: int
    preset: str | None
    max_cr: float | None
    source: str
    auto_compress: bool = False
    keep_copy: bool = True
    forward_to: list[str] | None = None
    forward_what: list[str] | None = None

    def forward_options(self) -> dict[str, Any]:
        """What the policy's forward action sends, as job options (nothing when it has none)."""
        if not self.forward_to:
            return {}
        return {
            "forward_to": list(self.forward_to),
            "forward_what": list(self.forward_what or DEFAULT_FORWARD_WHAT),
        }

    @property
    def forwards_only(self) -> bool:
        """Forwards without compressing or classifying: its action sends the originals."""
        return bool(self.forward_to) and not (self.auto_compress or self.auto_classify)

    @property
    def acts(self) -> bool:
        """Whether the policy does something by itself when a study is complete."""
        return self.auto_classify or self.auto_compress or bool(self.forward_to)

    @property
    def id(self) -> int:  # the same as policy_id, for callers that treat it like the row
        return self.policy_id

    @property
    def output_syntax(self) -> OutputSyntax:
        return OutputSyntax(self.syntax)


# --------------------------------------------------------------------------- values


def _syntax_for(cr: float, syntax: str | None) -> str:
    return OutputSyntax.for_cr(cr, syntax).value


def _same_family(syntax: str, cr: float) -> str:
    """``syntax`` when it suits ``cr``, else the syntax of its family that does (a policy set
    to HTJ2K stays HTJ2K when a preset changes its CR)."""
    codec = OutputSyntax(syntax).codec
    return codec.lossless_name if cr == 1 else codec.lossy_name


def _expected(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= MAX_EXPECTED_INSTANCES:
        raise InvalidParameter(
            f"expected instances {value} is out of range: use 1 to {MAX_EXPECTED_INSTANCES}, "
            "or none to classify on quiet time alone"
        )
    return value


def _quiet(value: int) -> int:
    if not 0 <= value <= MAX_QUIET_SECONDS:
        raise InvalidParameter(
            f"quiet seconds {value} is out of range: use 0 to {MAX_QUIET_SECONDS}"
        )
    return value


def _auto_classify(value: bool, key: PolicyKey) -> bool:
    """Classification only where a model reads the modality (mammography)."""
    if value and key.modality not in (ANY, CLASSIFIABLE_MODALITY):
        raise InvalidParameter(
            f"a policy for {key.modality} cannot classify: the installed models read "
            f"{CLASSIFIABLE_MODALITY} images only (compress and forward work for every modality)"
        )
    return value


def _destinations(session: Session, names: list[str] | None) -> list[str] | None:
    """Destination names, each registered (``/destinations``); None or [] = no forwarding."""
    if not names:
        return None
    known = set(session.scalars(select(Destination.name)))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidParameter(
            f"unknown destination {unknown[0]!r}: register it first (POST /destinations or "
            f"crgate destination add); known: {', '.join(sorted(known)) or 'none'}"
        )
    return list(dict.fromkeys(names))


def _forward_what(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    wrong = [v for v in values if v not in FORWARDABLE]
    if wrong:
        raise InvalidParameter(f"forward_what {wrong[0]!r}: choose among {', '.join(FORWARDABLE)}")
    return list(dict.fromkeys(values))


def _reason(value: str | None) -> str | None:
    return value.strip() if value and value.strip() else None


def snapshot(row: Policy) -> dict[str, Any]:
    """The row's values as a JSON-ready dict (what the audit log keeps)."""
    return {
        "id": row.id,
        "modality": row.modality,
        "body_part": row.body_part,
        "pediatric": row.pediatric,
        "cr": row.cr,
        "syntax": row.syntax,
        "auto_classify": row.auto_classify,
        "auto_compress": row.auto_compress,
        "keep_copy": row.keep_copy,
        "forward_to": row.forward_to,
        "forward_what": row.forward_what,
        "expected_instances": row.expected_instances,
        "quiet_seconds": row.quiet_seconds,
        "preset": row.preset,
        "max_cr": row.max_cr,
        "override_reason": row.override_reason,
    }


def source_of(row: Policy) -> str:
    """How job results name the policy, e.g. ``policy 3 (MG/BREAST, preset RCR)``."""
    parts = [PolicyKey.of_row(row).label]
    if row.preset:
        parts.append(f"preset {row.preset}")
    if row.override_reason:
        parts.append("override")
    return f"policy {row.id} ({', '.join(parts)})"[:128]


# --------------------------------------------------------------------------- reads


def list_policies(session: Session) -> list[Policy]:
    return list(session.scalars(select(Policy).order_by(Policy.id)))


def get_policy(session: Session, policy_id: int) -> Policy:
    row = session.get(Policy, policy_id)
    if row is None:
        raise NotFound(f"no policy with id {policy_id}")
    return row


def find_policy(session: Session, key: PolicyKey) -> Policy | None:
    query = select(Policy).where(
        Policy.modality == key.modality,
        Policy.body_part == key.body_part,
        Policy.pediatric == key.pediatric,
    )
    return session.scalars(query).first()


def _compatible(a: str, b: str) -> bool:
    return a == b or ANY in (a, b)


def ceiling(session: Session, key: PolicyKey, row: Policy | None = None) -> Ceiling | None:
    """The guideline maximum for ``key``: the row's own preset maximum, else the maximum of the
    preset last applied to its modality (the lowest of that preset's rows that overlap ``key``)."""
    if row is not None and row.max_cr is not None and row.preset:
        return Ceiling(row.max_cr, row.preset)
    if key.modality == ANY:
        return None
    query = select(Policy).where(
        Policy.modality == key.modality, Policy.max_cr.is_not(None), Policy.preset.is_not(None)
    )
    candidates = [p for p in session.scalars(query) if row is None or p.id != row.id]
    if not candidates:
        return None
    last = max(candidates, key=lambda p: (p.updated_at, p.id)).preset
    assert last is not None
    of_last = [p for p in candidates if p.preset == last]
    overlapping = [
        p
        for p in of_last
        if _compatible(p.body_part, key.body_part) and _compatible(p.pediatric, key.pediatric)
    ]
    lowest = min(p.max_cr for p in (overlapping or of_last) if p.max_cr is not None)
    return Ceiling(lowest, last)


@dataclass(frozen=True)
class Violation:
    """A policy above the ceiling that applies to it, with no override reason."""

    policy_id: int
    policy: str
    cr: float
    max_cr: float
    preset: str

    @property
    def message(self) -> str:
        return (
            f"policy {self.policy_id} ({self.policy}) has CR {self.cr:g}, above the maximum "
            f"{self.max_cr:g} of preset {self.preset}, with no override reason: lower it or "
            "give a reason"
        )


def violation_of(session: Session, row: Policy) -> Violation | None:
    """The row's violation, if it is above its ceiling without a reason (a later preset for the
    modality can put a policy set earlier above the new ceiling)."""
    limit = ceiling(session, PolicyKey.of_row(row), row)
    if limit is None or row.cr <= limit.max_cr or row.override_reason:
        return None
    return Violation(row.id, PolicyKey.of_row(row).label, row.cr, limit.max_cr, limit.preset)


def violations(session: Session) -> list[Violation]:
    """Every policy above its ceiling without a reason, by id."""
    found = (violation_of(session, row) for row in list_policies(session))
    return [v for v in found if v is not None]


def _checked_override(
    cr: float, limit: Ceiling | None, reason: str | None, key: PolicyKey
) -> str | None:
    """The override reason to keep: None within the ceiling; required above it."""
    if limit is None or cr <= limit.max_cr:
        return None
    if reason is None:
        raise OverrideRequired(
            f"CR {cr:g} for {key.label} is above the maximum {limit.max_cr:g} set by preset "
            f"{limit.preset}: give an override reason to go above it",
            cr=cr,
            max_cr=limit.max_cr,
            preset=limit.preset,
        )
    return reason


def _modalities(value: str | Iterable[str] | None) -> set[str]:
    if value is None:
        return set()
    words = value.replace("\\", " ").split() if isinstance(value, str) else value
    return {w.strip().upper() for w in words if w.strip()}


def resolve_policy(
    session: Session,
    *,
    modality: str | Iterable[str] | None,
    body_part: str | None,
    pediatric: bool | None,
) -> ResolvedPolicy:
    """The policy for a study. ``modality`` may be multi-valued ("MG\\\\SR" or a list)."""
    modalities = _modalities(modality)
    part = (body_part or "").strip().upper()
    wanted = None if pediatric is None else pediatric_value(pediatric)
    best: tuple[tuple[bool, bool, bool, float, int], Policy] | None = None
    for row in list_policies(session):
        if row.modality != ANY and row.modality not in modalities:
            continue
        if row.body_part != ANY and row.body_part != part:
            continue
        if row.pediatric != ANY and wanted is not None and row.pediatric != wanted:
            continue
        # specificity first; then the lowest CR, then the oldest policy
        score = (
            row.modality != ANY,
            row.body_part != ANY,
            row.pediatric != ANY and wanted is not None,
            -row.cr,
            -row.id,
        )
        if best is None or score > best[0]:
            best = (score, row)
    if best is None:
        raise NotFound(
            "no CR policy matches and the default policy is missing: restart crgate to "
            "recreate it, or create one for modality *"
        )
    row = best[1]
    return ResolvedPolicy(
        policy_id=row.id,
        modality=row.modality,
        body_part=row.body_part,
        pediatric=row.pediatric,
        cr=row.cr,
        syntax=row.syntax,
        auto_classify=row.auto_classify,
        expected_instances=row.expected_instances,
        quiet_seconds=row.quiet_seconds,
        preset=row.preset,
        max_cr=row.max_cr,
        source=source_of(row),
        auto_compress=row.auto_compress,
        keep_copy=row.keep_copy,
        forward_to=row.forward_to,
        forward_what=row.forward_what,
    )


# --------------------------------------------------------------------------- changes


def _flush_unique(session: Session, key: PolicyKey) -> None:
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"a policy for {key.label} exists already") from None


def create_policy(session: Session, spec: PolicySpec, *, actor: str) -> Policy:
    """Add a policy (409 Conflict when one exists for the same key); its modality and body part
    must be DICOM defined terms."""
    key = check_terms(spec.key)
    existing = find_policy(session, key)
    if existing is not None:
        raise Conflict(
            f"a policy for {key.label} exists already (policy {existing.id}): change that one"
        )
    cr = validate_cr(spec.cr)
    syntax = _syntax_for(cr, spec.syntax)
    reason = _checked_override(cr, ceiling(session, key), _reason(spec.override_reason), key)
    now = _now()
    row = Policy(
        modality=key.modality,
        body_part=key.body_part,
        pediatric=key.pediatric,
        cr=cr,
        syntax=syntax,
        auto_classify=_auto_classify(spec.auto_classify, key),
        auto_compress=spec.auto_compress,
        keep_copy=spec.keep_copy,
        forward_to=_destinations(session, spec.forward_to),
        forward_what=_forward_what(spec.forward_what),
        expected_instances=_expected(spec.expected_instances),
        quiet_seconds=_quiet(spec.quiet_seconds),
        preset=None,
        max_cr=None,
        override_reason=reason,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    _flush_unique(session, key)
    audit.record(
        session,
        actor=actor,
        action="create",
        entity=ENTITY,
        entity_id=row.id,
        before=None,
        after=snapshot(row),
        reason=reason,
    )
    return row


def update_policy(
    session: Session,
    policy_id: int,
    changes: PolicyChanges,
    *,
    actor: str,
    override_reason: str | None = None,
) -> Policy:
    """Change a policy's values (its key stays). Setting a CR above the ceiling needs a reason;
    a change that changes nothing is not logged."""
    row = get_policy(session, policy_id)
    key = PolicyKey.of_row(row)
    before = snapshot(row)
    given = _reason(override_reason)
    cr = validate_cr(changes["cr"]) if "cr" in changes else row.cr
    if "syntax" in changes:
        syntax = _syntax_for(cr, changes["syntax"])
    elif "cr" in changes:
        syntax = _syntax_for(cr, None)
    else:
        syntax = row.syntax
    limit = ceiling(session, key, row)
    if "cr" in changes:
        reason = _checked_override(cr, limit, given, key)
    elif limit is not None and cr > limit.max_cr:
        reason = given or row.override_reason  # an unrelated edit keeps the recorded reason
    else:
        reason = None
    row.cr = cr
    row.syntax = syntax
    if "auto_classify" in changes:
        row.auto_classify = _auto_classify(bool(changes["auto_classify"]), key)
    if "auto_compress" in changes:
        row.auto_compress = bool(changes["auto_compress"])
    if "keep_copy" in changes:
        row.keep_copy = bool(changes["keep_copy"])
    if "forward_to" in changes:
        row.forward_to = _destinations(session, changes["forward_to"])
    if "forward_what" in changes:
        row.forward_what = _forward_what(changes["forward_what"])
    if "expected_instances" in changes:
        row.expected_instances = _expected(changes["expected_instances"])
    if "quiet_seconds" in changes:
        row.quiet_seconds = _quiet(changes["quiet_seconds"])
    row.override_reason = reason
    after = snapshot(row)
    if after != before:
        row.updated_at = _now()
        session.flush()
        audit.record(
            session,
            actor=actor,
            action="update",
            entity=ENTITY,
            entity_id=row.id,
            before=before,
            after=after,
            reason=given if reason else None,
        )
    return row


def set_policy(
    session: Session,
    key: PolicyKey,
    changes: PolicyChanges,
    *,
    actor: str,
    override_reason: str | None = None,
) -> tuple[Policy, bool]:
    """Create the policy for ``key`` or change the existing one; True when it was created."""
    row = find_policy(session, key)
    if row is not None:
        return update_policy(
            session, row.id, changes, actor=actor, override_reason=override_reason
        ), False
    if "cr" not in changes:
        raise InvalidParameter(f"there is no policy for {key.label} yet: a new one needs a CR")
    spec = PolicySpec(
        key=key,
        cr=changes["cr"],
        syntax=changes.get("syntax"),
        auto_classify=changes.get("auto_classify", False),
        auto_compress=changes.get("auto_compress", False),
        keep_copy=changes.get("keep_copy", True),
        forward_to=changes.get("forward_to"),
        forward_what=changes.get("forward_what"),
        expected_instances=changes.get("expected_instances"),
        quiet_seconds=changes.get("quiet_seconds", DEFAULT_QUIET_SECONDS),
        override_reason=override_reason,
    )
    return create_policy(session, spec, actor=actor), True


def delete_policy(
    session: Session, policy_id: int, *, actor: str, reason: str | None = None
) -> None:
    row = get_policy(session, policy_id)
    if PolicyKey.of_row(row).is_default:
        raise Conflict("the default policy (modality *) cannot be deleted: change its CR instead")
    before = snapshot(row)
    session.delete(row)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="delete",
        entity=ENTITY,
        entity_id=policy_id,
        before=before,
        after=None,
        reason=_reason(reason),
    )


def ensure_default_policy(session: Session, settings: Settings) -> Policy:
    """The default policy; created (CR = settings.default_cr) when missing.

    Two processes starting at once (``crgate api`` and ``crgate scp``) may both try: the insert
    runs in a savepoint, and the loser takes the winner's row.
    """
    row = find_policy(session, DEFAULT_KEY)
    if row is not None:
        return row
    cr = validate_cr(settings.default_cr)
    now = _now()
    row = Policy(
        modality=ANY,
        body_part=ANY,
        pediatric=ANY,
        cr=cr,
        syntax=_syntax_for(cr, None),
        auto_classify=False,
        expected_instances=None,
        quiet_seconds=DEFAULT_QUIET_SECONDS,
        created_at=now,
        updated_at=now,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        winner = find_policy(session, DEFAULT_KEY)
        if winner is None:
            raise
        return winner
    audit.record(
        session,
        actor="system",
        action="create",
        entity=ENTITY,
        entity_id=row.id,
        before=None,
        after=snapshot(row),
        reason="default policy created at start (CRGATE_DEFAULT_CR)",
    )
    return row


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class PresetRow:
    """One guideline row; ``modalities`` and ``body_parts`` expand into one policy each."""

    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    pediatric: str
    max_cr: float
    note: str

    def policy_keys(self) -> list[PolicyKey]:
        return [PolicyKey(m, b, self.pediatric) for m in self.modalities for b in self.body_parts]


@dataclass(frozen=True)
class Preset:
    name: str
    rows: tuple[PresetRow, ...]

    def targets(self) -> dict[PolicyKey, float]:
        """Each policy key the preset sets and its maximum (the lowest if rows overlap)."""
        out: dict[PolicyKey, float] = {}
        for row in self.rows:
            for key in row.policy_keys():
                out[key] = min(out.get(key, row.max_cr), row.max_cr)
        return out


@dataclass(frozen=True)
class Skipped:
    """A policy whose stricter CR a preset kept (it only set the ceiling)."""

    policy_id: int
    policy: str
    cr: float
    preset_cr: float
    reason: str


@dataclass(frozen=True)
class PresetResult:
    preset: str
    created: list[int]
    updated: list[int]
    unchanged: list[int]
    skipped: list[Skipped]


def parse_presets(text: str) -> dict[str, Preset]:
    """Presets from CSV text (columns preset, modality, body_part, pediatric, max_cr, note)."""
    rows: dict[str, list[PresetRow]] = {}
    reader = csv.DictReader(io.StringIO(text))
    for line, record in enumerate(reader, start=2):
        try:
            name = record["preset"].strip().upper()
            row = PresetRow(
                modalities=tuple(
                    _code(m, "modality", MODALITIES) for m in record["modality"].split()
                ),
                body_parts=tuple(
                    _code(b, "body part", BODY_PARTS) for b in record["body_part"].split()
                ),
                pediatric=pediatric_value(record["pediatric"]),
                max_cr=validate_cr(record["max_cr"]),
                note=(record.get("note") or "").strip(),
            )
        except (KeyError, AttributeError, InvalidParameter) as exc:
            raise InvalidParameter(f"{PRESETS_FILE} line {line}: {exc}") from None
        if not name or not row.modalities or not row.body_parts:
            raise InvalidParameter(f"{PRESETS_FILE} line {line}: empty preset, modality or part")
        rows.setdefault(name, []).append(row)
    return {name: Preset(name, tuple(r)) for name, r in sorted(rows.items())}


@lru_cache(maxsize=1)
def load_presets() -> dict[str, Preset]:
    """The shipped presets (services/core/data/cr-guidelines.csv)."""
    text = resources.files("services.core").joinpath("data", PRESETS_FILE).read_text("utf-8")
    return parse_presets(text)


def get_preset(name: str) -> Preset:
    presets = load_presets()
    preset = presets.get(name.strip().upper())
    if preset is None:
        raise NotFound(f"no preset {name!r}: choose one of {', '.join(presets)}")
    return preset


def apply_preset(session: Session, name: str, *, actor: str, force: bool = False) -> PresetResult:
    """Create or update one policy per preset key: the preset's maximum becomes its ceiling
    (``max_cr``) and, for new policies and those above it, its CR.

    A policy with a stricter (lower) CR keeps it and is reported in ``skipped``, unless
    ``force``: a preset never raises a value set earlier without being asked to. Existing
    policies keep their syntax family, auto_classify, expected_instances and quiet_seconds; new
    MG policies expect 4 instances (a screening study). Applying a preset twice changes nothing
    the second time.
    """
    preset = get_preset(name)
    result = PresetResult(preset.name, [], [], [], [])
    reason = f"preset {preset.name} applied" + (" with force" if force else "")
    for key, max_cr in preset.targets().items():
        syntax = _syntax_for(max_cr, None)
        row = find_policy(session, key)
        if row is None:
            now = _now()
            row = Policy(
                modality=key.modality,
                body_part=key.body_part,
                pediatric=key.pediatric,
                cr=max_cr,
                syntax=syntax,
                auto_classify=False,
                expected_instances=MG_SCREENING_VIEWS if key.modality == "MG" else None,
                quiet_seconds=DEFAULT_QUIET_SECONDS,
                preset=preset.name,
                max_cr=max_cr,
                override_reason=None,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            _flush_unique(session, key)
            result.created.append(row.id)
            before = None
        else:
            before = snapshot(row)
            if row.cr < max_cr and not force:
                result.skipped.append(
                    Skipped(
                        row.id,
                        key.label,
                        row.cr,
                        max_cr,
                        f"kept the stricter CR {row.cr:g} of policy {row.id} ({key.label}): "
                        f"preset {preset.name} allows up to {max_cr:g}; apply it with force to "
                        "raise the CR",
                    )
                )
            else:
                row.cr, row.syntax = max_cr, _same_family(row.syntax, max_cr)
            row.preset, row.max_cr = preset.name, max_cr
            row.override_reason = None
            if snapshot(row) == before:
                result.unchanged.append(row.id)
                continue
            row.updated_at = _now()
            session.flush()
            result.updated.append(row.id)
        audit.record(
            session,
            actor=actor,
            action="create" if before is None else "update",
            entity=ENTITY,
            entity_id=row.id,
            before=before,
            after=snapshot(row),
            reason=reason,
        )
    return result
