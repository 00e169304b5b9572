"""CR policies, guideline presets and the audit log.

Operators read policies (they need to see which CR will apply); every write and the audit log
need an admin key. Every change is audit-logged with the key's name as the actor.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from services.api.deps import SessionDep, require
from services.core import audit, policies
from services.core.auth import Principal, Role
from services.core.codecs import SYNTAX_HELP, OutputSyntax
from services.core.db.tables import AuditEntry, Policy
from services.core.params import MAX_COUNT
from services.core.policies import PolicyChanges, PolicyKey, PolicySpec

router = APIRouter(tags=["policies"])

Forwardable = Literal["originals", "compressed", "results"]
READ = require(Role.OPERATOR)
ADMIN = require(Role.ADMIN)
AdminDep = Annotated[Principal | None, Depends(ADMIN)]
PolicyId = Annotated[int, Path(ge=1, le=2**31 - 1, description="the policy's id")]

CR_HELP = "compression ratio: 1 = lossless, above 1 = irreversible coding at that ratio"
REASON_HELP = "why the CR may exceed the guideline maximum; required when it does"


class PolicyIn(BaseModel):
    """A new policy."""

    modality: str = Field(
        description="a DICOM Modality defined term (PS3.3 C.7.3.1.1.1, one, like MG or CT), or * "
        "for any",
        examples=["MG"],
    )
    body_part: str = Field(
        "*",
        description="a DICOM Body Part Examined defined term (PS3.16 Annex L, CID 4031; "
        "case-insensitive), or * for any",
    )
    pediatric: bool | None = Field(
        None, description="true: pediatric patients only; false: adults only; null: any"
    )
    cr: float = Field(description=CR_HELP, examples=[20])
    syntax: OutputSyntax | None = Field(None, description=SYNTAX_HELP)
    auto_classify: bool = Field(
        False,
        description="classify a study by itself once it is complete (or quiet); only for MG "
        "or * (the modality the models read)",
    )
    auto_compress: bool = Field(
        False, description="compress the matching images of a complete study at the CR"
    )
    keep_copy: bool = Field(
        True,
        description="keep compressed copies in the study as a derived series; false: only "
        "send them to the destinations",
    )
    forward_to: list[str] | None = Field(
        None, max_length=16, description="registered destination names to forward to"
    )
    forward_what: list[Forwardable] | None = Field(
        None,
        max_length=3,
        description="what is forwarded: originals, compressed, results (default: compressed "
        "and results)",
    )
    expected_instances: int | None = Field(
        None, ge=1, description="a study is complete at this many instances (MG screening: 4)"
    )
    quiet_seconds: int = Field(
        policies.DEFAULT_QUIET_SECONDS,
        ge=0,
        le=policies.MAX_QUIET_SECONDS,
        description="a study with no new instance for this long counts as complete",
    )
    override_reason: str | None = Field(None, description=REASON_HELP)


class PolicyUpdate(BaseModel):
    """Changes to a policy; fields left out keep their values (modality, body part and
    pediatric cannot change: delete the policy and create another)."""

    cr: float | None = Field(None, description=CR_HELP)
    syntax: OutputSyntax | None = Field(None, description=SYNTAX_HELP)
    auto_classify: bool | None = Field(None, description="classify complete studies by itself")
    auto_compress: bool | None = Field(None, description="compress complete studies by itself")
    keep_copy: bool | None = Field(None, description="keep compressed copies in the study")
    forward_to: list[str] | None = Field(
        None, max_length=16, description="destination names; [] or null stops forwarding"
    )
    forward_what: list[Forwardable] | None = Field(
        None, max_length=3, description="originals, compressed, results"
    )
    expected_instances: int | None = Field(
        None, ge=1, description="instances that make a study complete; null clears it"
    )
    quiet_seconds: int | None = Field(
        None, ge=0, le=policies.MAX_QUIET_SECONDS, description="quiet time that completes a study"
    )
    override_reason: str | None = Field(None, description=REASON_HELP)


class PolicyOut(BaseModel):
    id: int
    modality: str = Field(description="DICOM Modality or * (any)")
    body_part: str = Field(description="DICOM Body Part Examined or * (any)")
    pediatric: bool | None = Field(description="true pediatric, false adult, null any")
    cr: float = Field(description=CR_HELP)
    syntax: OutputSyntax
    auto_classify: bool
    auto_compress: bool
    keep_copy: bool
    forward_to: list[str] | None
    forward_what: list[str] | None
    expected_instances: int | None
    quiet_seconds: int
    preset: str | None = Field(description="the guideline preset that last set this policy")
    max_cr: float | None = Field(
        description="guideline maximum CR: the preset's, or that of the preset last applied to "
        "this modality; above it, a change needs an override reason"
    )
    max_cr_preset: str | None = Field(description="the preset that set max_cr")
    override_reason: str | None = Field(description="why the CR is above max_cr, if it is")
    violation: str | None = Field(
        description="set when the CR is above max_cr with no override reason (a later preset "
        "can put a policy there): lower it or give a reason"
    )
    default: bool = Field(description="the default policy (cannot be deleted)")
    source: str = Field(description="how job results name this policy")
    created_at: datetime
    updated_at: datetime


class ResolvedOut(BaseModel):
    policy_id: int
    cr: float
    syntax: OutputSyntax
    auto_classify: bool
    auto_compress: bool
    keep_copy: bool
    forward_to: list[str] | None
    forward_what: list[str] | None
    expected_instances: int | None
    quiet_seconds: int
    preset: str | None
    max_cr: float | None
    source: str = Field(description="the policy that applies, as job results name it")


class PresetRowOut(BaseModel):
    modalities: list[str] = Field(description="one policy per modality and body part")
    body_parts: list[str]
    pediatric: bool | None
    max_cr: float = Field(description="the guideline's maximum CR; the policies get this CR")
    note: str


class PresetOut(BaseModel):
    name: str
    rows: list[PresetRowOut]
    policy_count: int = Field(description="how many policies applying the preset sets")


class SkippedOut(BaseModel):
    policy_id: int
    policy: str
    cr: float = Field(description="the stricter CR the policy kept")
    preset_cr: float = Field(description="the preset's maximum, now the policy's ceiling")
    reason: str


class PresetApplied(BaseModel):
    preset: str
    created: list[int] = Field(description="ids of policies created")
    updated: list[int] = Field(description="ids of policies changed")
    unchanged: list[int] = Field(description="ids of policies that already matched the preset")
    skipped: list[SkippedOut] = Field(
        description="policies whose stricter CR the preset kept (it set their ceiling only); "
        "apply with force=true to raise them"
    )
    policies: list[PolicyOut]
    violations: list[str] = Field(description="policies above their ceiling after the change")


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str = Field(description="the API key's name, cli:<user>, or system")
    action: str = Field(description="create, update or delete")
    entity: str
    entity_id: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str | None


class AuditPage(BaseModel):
    items: list[AuditOut] = Field(description="newest first")
    total: int = Field(description="entries in all (for the entity filter)")
    limit: int
    offset: int


def _utc(value: datetime) -> datetime:
    """SQLite gives naive datetimes; crgate writes UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _actor(principal: Principal | None) -> str:
    return principal.name if principal is not None else "unknown"


def _violation_text(session: Session, row: Policy) -> str | None:
    found = policies.violation_of(session, row)
    return found.message if found else None


def _out(session: Session, row: Policy) -> PolicyOut:
    key = PolicyKey.of_row(row)
    limit = policies.ceiling(session, key, row)
    return PolicyOut(
        id=row.id,
        modality=row.modality,
        body_part=row.body_part,
        pediatric=policies.pediatric_flag(row.pediatric),
        cr=row.cr,
        syntax=OutputSyntax(row.syntax),
        auto_classify=row.auto_classify,
        auto_compress=row.auto_compress,
        keep_copy=row.keep_copy,
        forward_to=row.forward_to,
        forward_what=row.forward_what,
        expected_instances=row.expected_instances,
        quiet_seconds=row.quiet_seconds,
        preset=row.preset,
        max_cr=limit.max_cr if limit else None,
        max_cr_preset=limit.preset if limit else None,
        override_reason=row.override_reason,
        violation=_violation_text(session, row),
        default=key.is_default,
        source=policies.source_of(row),
        created_at=_utc(row.created_at),
        updated_at=_utc(row.updated_at),
    )


@router.get(
    "/policies",
    summary="List CR policies",
    response_model=list[PolicyOut],
    dependencies=[Depends(READ)],
)
def list_policies(session: SessionDep) -> list[PolicyOut]:
    return [_out(session, row) for row in policies.list_policies(session)]


@router.post(
    "/policies",
    summary="Create a CR policy",
    status_code=201,
    response_model=PolicyOut,
    responses={409: {"description": "a policy for the same key exists"}},
)
def create_policy(body: PolicyIn, session: SessionDep, principal: AdminDep) -> Any:
    with session.begin():
        spec = PolicySpec(
            key=PolicyKey.of(body.modality, body.body_part, body.pediatric),
            cr=body.cr,
            syntax=body.syntax.value if body.syntax else None,
            auto_classify=body.auto_classify,
            auto_compress=body.auto_compress,
            keep_copy=body.keep_copy,
            forward_to=body.forward_to,
            forward_what=[str(w) for w in body.forward_what or []],
            expected_instances=body.expected_instances,
            quiet_seconds=body.quiet_seconds,
            override_reason=body.override_reason,
        )
        row = policies.create_policy(session, spec, actor=_actor(principal))
        return _out(session, row)


@router.get(
    "/policies/presets",
    summary="List the guideline presets and their rows",
    response_model=list[PresetOut],
    dependencies=[Depends(READ)],
)
def list_presets() -> list[PresetOut]:
    return [
        PresetOut(
            name=preset.name,
            rows=[
                PresetRowOut(
                    modalities=list(row.modalities),
                    body_parts=list(row.body_parts),
                    pediatric=policies.pediatric_flag(row.pediatric),
                    max_cr=row.max_cr,
                    note=row.note,
                )
                for row in preset.rows
            ],
            policy_count=len(preset.targets()),
        )
        for preset in policies.load_presets().values()
    ]


@router.post(
    "/policies/presets/{name}",
    summary="Apply a guideline preset (creates or updates one policy per row)",
    response_model=PresetApplied,
    responses={404: {"description": "no such preset (the answer lists the names)"}},
)
def apply_preset(
    name: str,
    session: SessionDep,
    principal: AdminDep,
    force: Annotated[
        bool, Query(description="raise policies with a stricter CR to the preset's maximum too")
    ] = False,
) -> PresetApplied:
    with session.begin():
        result = policies.apply_preset(session, name, actor=_actor(principal), force=force)
        ids = set(result.created + result.updated + result.unchanged)
        rows = [row for row in policies.list_policies(session) if row.id in ids]
        return PresetApplied(
            preset=result.preset,
            created=result.created,
            updated=result.updated,
            unchanged=result.unchanged,
            skipped=[SkippedOut(**vars(s)) for s in result.skipped],
            policies=[_out(session, row) for row in rows],
            violations=[v.message for v in policies.violations(session)],
        )


@router.get(
    "/policies/resolve",
    summary="The policy that applies to a study of this modality, body part and age group",
    response_model=ResolvedOut,
    dependencies=[Depends(READ)],
)
def resolve(
    session: SessionDep,
    modality: Annotated[
        str | None, Query(description="DICOM Modality; several separated by \\ or spaces")
    ] = None,
    body_part: Annotated[str | None, Query(description="DICOM Body Part Examined")] = None,
    pediatric: Annotated[bool | None, Query(description="left out: unknown")] = None,
) -> ResolvedOut:
    found = policies.resolve_policy(
        session, modality=modality, body_part=body_part, pediatric=pediatric
    )
    return ResolvedOut(
        policy_id=found.policy_id,
        cr=found.cr,
        syntax=found.output_syntax,
        auto_classify=found.auto_classify,
        auto_compress=found.auto_compress,
        keep_copy=found.keep_copy,
        forward_to=found.forward_to,
        forward_what=found.forward_what,
        expected_instances=found.expected_instances,
        quiet_seconds=found.quiet_seconds,
        preset=found.preset,
        max_cr=found.max_cr,
        source=found.source,
    )


@router.get(
    "/policies/{policy_id}",
    summary="One CR policy",
    response_model=PolicyOut,
    dependencies=[Depends(READ)],
)
def get_policy(policy_id: PolicyId, session: SessionDep) -> PolicyOut:
    return _out(session, policies.get_policy(session, policy_id))


@router.put(
    "/policies/{policy_id}",
    summary="Change a CR policy (fields left out keep their values)",
    response_model=PolicyOut,
)
def update_policy(
    policy_id: PolicyId, body: PolicyUpdate, session: SessionDep, principal: AdminDep
) -> Any:
    changes: PolicyChanges = {}
    given = body.model_fields_set
    if body.cr is not None:
        changes["cr"] = body.cr
    if body.syntax is not None:
        changes["syntax"] = body.syntax.value
    if body.auto_classify is not None:
        changes["auto_classify"] = body.auto_classify
    if body.auto_compress is not None:
        changes["auto_compress"] = body.auto_compress
    if body.keep_copy is not None:
        changes["keep_copy"] = body.keep_copy
    if "forward_to" in given:
        changes["forward_to"] = body.forward_to
    if "forward_what" in given:
        changes["forward_what"] = [str(w) for w in body.forward_what or []]
    if "expected_instances" in given:
        changes["expected_instances"] = body.expected_instances
    if body.quiet_seconds is not None:
        changes["quiet_seconds"] = body.quiet_seconds
    with session.begin():
        row = policies.update_policy(
            session,
            policy_id,
            changes,
            actor=_actor(principal),
            override_reason=body.override_reason,
        )
        return _out(session, row)


@router.delete(
    "/policies/{policy_id}",
    summary="Delete a CR policy (not the default one)",
    status_code=204,
    response_class=Response,
    responses={409: {"description": "the default policy cannot be deleted"}},
)
def delete_policy(policy_id: PolicyId, session: SessionDep, principal: AdminDep) -> Response:
    with session.begin():
        policies.delete_policy(session, policy_id, actor=_actor(principal))
    return Response(status_code=204)


@router.get(
    "/audit",
    summary="The audit log, newest first",
    response_model=AuditPage,
    dependencies=[Depends(ADMIN)],
    tags=["audit"],
)
def list_audit(
    session: SessionDep,
    entity: Annotated[
        str | None, Query(description=f"only this entity: {', '.join(audit.ENTITIES)}")
    ] = None,
    since: Annotated[
        datetime | None, Query(description="only entries at or after this time (ISO 8601)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=audit.MAX_LIMIT)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_COUNT)] = 0,
) -> AuditPage:
    rows, total = audit.entries(session, entity=entity, since=since, limit=limit, offset=offset)
    return AuditPage(items=[_audit_out(r) for r in rows], total=total, limit=limit, offset=offset)


def _audit_out(row: AuditEntry) -> AuditOut:
    return AuditOut(
        id=row.id,
        at=_utc(row.at),
        actor=row.actor,
        action=row.action,
        entity=row.entity,
        entity_id=row.entity_id,
        before=row.before,
        after=row.after,
        reason=row.reason,
    )
