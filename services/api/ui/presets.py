"""What applying a guideline preset would change, for the console's policies page.

Read-only: the same targets and the same rule as ``policies.apply_preset`` (a missing policy is
created at the preset's maximum, a higher CR is lowered to it, a stricter one is kept and only
gets the ceiling), computed without writing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from services.core import policies


@dataclass(frozen=True)
class Change:
    policy: str  # the key's label, e.g. MG/BREAST
    policy_id: int | None
    what: str  # create, lower, keep, ceiling, unchanged
    text: str


@dataclass(frozen=True)
class Preview:
    name: str
    changes: list[Change]


def preview_all(session: Session) -> list[Preview]:
    return [preview(session, name) for name in policies.load_presets()]


def preview(session: Session, name: str) -> Preview:
    preset = policies.get_preset(name)
    changes = []
    for key, max_cr in preset.targets().items():
        row = policies.find_policy(session, key)
        if row is None:
            changes.append(Change(key.label, None, "create", f"creates it at CR {max_cr:g}"))
        elif row.cr < max_cr:
            text = f"keeps its stricter CR {row.cr:g}; the ceiling becomes {max_cr:g}"
            changes.append(Change(key.label, row.id, "keep", text))
        elif row.cr > max_cr:
            text = f"lowers CR {row.cr:g} to {max_cr:g}"
            if row.override_reason:
                text += " and drops its override reason"
            changes.append(Change(key.label, row.id, "lower", text))
        elif row.preset != preset.name or row.max_cr != max_cr or row.override_reason:
            text = f"keeps CR {row.cr:g}; the ceiling becomes {max_cr:g} ({preset.name})"
            changes.append(Change(key.label, row.id, "ceiling", text))
        else:
            changes.append(Change(key.label, row.id, "unchanged", "unchanged"))
    return Preview(preset.name, changes)
