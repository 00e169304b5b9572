"""The ``crgate`` command line (typer): one module per command group, shared helpers in
``common`` (output, the one-line error exit, settings, progress, CR lists).

| module | commands |
| --- | --- |
| images | transcode, inspect, synth |
| model | classify, train, model import, list, show, remove |
| servers | api, scp, serve, worker, migrate |
| keys | keys create, list, revoke |
| policy | policy list, set, preset, delete |
| audit | audit (the audit log) |
| destination | destination add, list, echo, delete |
| forward | forward list, resend |
| deletion | delete study, retention run |
| demo | demo |
| study | study (the CR safety study) |
| experiment | experiment (the seed study's training experiments) |
"""

from __future__ import annotations

import typer

from services.cli import (
    audit,
    deletion,
    demo,
    destination,
    experiment,
    forward,
    images,
    keys,
    model,
    policy,
    servers,
    study,
)

app = typer.Typer(
    name="crgate",
    help="JPEG 2000 compression-and-inference gateway for radiology.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (
    images.transcode,
    images.inspect,
    images.synth,
    model.classify,
    model.train,
    servers.api,
    servers.scp,
    servers.serve,
    servers.worker,
    servers.migrate,
    demo.demo,
    study.study,
    experiment.experiment,
    audit.audit,
):
    app.command()(command)
app.add_typer(keys.keys_app, name="keys")
app.add_typer(policy.policy_app, name="policy")
app.add_typer(destination.destination_app, name="destination")
app.add_typer(forward.forward_app, name="forward")
app.add_typer(model.model_app, name="model")
app.add_typer(deletion.delete_app, name="delete")
app.add_typer(deletion.retention_app, name="retention")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="crgate")
