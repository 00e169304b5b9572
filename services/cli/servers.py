"""``crgate api | scp | serve | worker | migrate``: the processes docker-compose runs.

Each is assembled by services/runtime from one Settings (the environment, the options on top);
``serve`` and ``migrate`` create a data directory when there is none, the others need one.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from services.cli.common import DataDir, configure_logging, err, fail, settings_from
from services.core.config import Settings
from services.core.errors import CrgateError

HttpPort = Annotated[
    int | None, typer.Option("--http-port", help="HTTP port [env CRGATE_HTTP_PORT, 8080]")
]
DicomPort = Annotated[
    int | None, typer.Option("--dicom-port", help="DICOM port [env CRGATE_DICOM_PORT, 11112]")
]
AeTitle = Annotated[
    str | None, typer.Option("--ae-title", help="our AE title [env CRGATE_AE_TITLE, CRGATE]")
]
AllowedAe = Annotated[
    str | None,
    typer.Option(
        "--allowed-ae",
        help="comma-separated calling AE titles to accept; empty accepts any "
        "[env CRGATE_ALLOWED_AE]",
    ),
]

Viewer = Annotated[
    Path | None,
    typer.Option(
        "--viewer",
        help="serve the OHIF viewer build in this folder under /viewer/ (`make viewer` makes "
        "build/ohif/dist) [env CRGATE_VIEWER_DIR]",
    ),
]

MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        min=0,
        max=65535,
        help="serve Prometheus /metrics on this HTTP port; 0 = off [env CRGATE_METRICS_PORT, 0]",
    ),
]


def _server_settings(
    data_dir: Path | None,
    http_port: int | None,
    dicom_port: int | None,
    ae_title: str | None,
    allowed_ae: str | None,
) -> Settings:
    """The settings of api, scp and serve, which take the same options (one config for all)."""
    return settings_from(
        data_dir=data_dir,
        http_port=http_port,
        dicom_port=dicom_port,
        ae_title=ae_title,
        allowed_ae=allowed_ae,
    )


def api(
    data_dir: DataDir = None,
    http_port: HttpPort = None,
    dicom_port: DicomPort = None,
    ae_title: AeTitle = None,
    allowed_ae: AllowedAe = None,
    viewer: Viewer = None,
) -> None:
    """Serve the HTTP API (DICOMweb, jobs, policies, /docs, /metrics)."""
    settings = _with_viewer(
        _server_settings(data_dir, http_port, dicom_port, ae_title, allowed_ae), viewer
    )
    _run(settings, http=True, dicom=False)


def scp(
    data_dir: DataDir = None,
    http_port: HttpPort = None,
    dicom_port: DicomPort = None,
    ae_title: AeTitle = None,
    allowed_ae: AllowedAe = None,
    metrics_port: MetricsPort = None,
) -> None:
    """Serve DICOM C-ECHO and C-STORE (a PACS pushes studies here)."""
    settings = _server_settings(data_dir, http_port, dicom_port, ae_title, allowed_ae)
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    _run(settings, http=False, dicom=True)


def serve(
    data_dir: DataDir = None,
    http_port: HttpPort = None,
    dicom_port: DicomPort = None,
    ae_title: AeTitle = None,
    allowed_ae: AllowedAe = None,
    viewer: Viewer = None,
) -> None:
    """Serve everything in one process: HTTP API and DICOM SCP on one ingest path (creates the
    data directory when there is none, and says so)."""
    settings = _with_viewer(
        _server_settings(data_dir, http_port, dicom_port, ae_title, allowed_ae), viewer
    )
    _run(settings, http=True, dicom=True, create=True)


def _with_viewer(settings: Settings, viewer: Path | None) -> Settings:
    """``--viewer`` on top of CRGATE_VIEWER_DIR, checked before anything starts."""
    from services.api.viewer import check_dist

    folder = viewer or settings.viewer_dir
    if folder is None:
        return settings
    try:
        return settings.model_copy(update={"viewer_dir": check_dist(folder)})
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None


def _run(settings: Settings, *, http: bool, dicom: bool, create: bool = False) -> None:
    """Serve; ``create`` (serve only) makes a new data directory when there is none."""
    configure_logging(settings)
    log = logging.getLogger("crgate")
    from services.runtime import build_runtime, start_scp

    try:
        state = build_runtime(settings, create=create)
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    server = None
    if dicom:
        try:
            server = start_scp(state)
        except OSError as exc:
            state.close()
            message = f"cannot listen on DICOM port {settings.dicom_port}: {exc.strerror}"
            raise fail(message, 5) from None
    metrics = None
    try:
        if not http and settings.metrics_port:  # api and serve have /metrics on their HTTP port
            from prometheus_client import start_http_server

            try:
                metrics, _ = start_http_server(settings.metrics_port, addr=settings.http_host)
            except OSError as exc:
                message = f"cannot listen on metrics port {settings.metrics_port}: {exc.strerror}"
                raise fail(message, 5) from None
            log.info("Prometheus metrics on port %d (/metrics)", settings.metrics_port)
        if http:
            import uvicorn

            from services.api.app import create_app

            log.info("HTTP API on port %d (OpenAPI docs at /docs)", settings.http_port)
            # uvicorn raises SIGTERM again after its graceful stop: exit through `finally`
            signal.signal(signal.SIGTERM, _exit_zero)
            uvicorn.run(
                create_app(state=state),
                host=settings.http_host,
                port=settings.http_port,
                log_config=None,
                access_log=False,
            )
        else:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            stop.wait()
    finally:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        if server is not None:
            server.shutdown()
        state.close()


def _exit_zero(*_: object) -> None:
    raise SystemExit(0)


def worker(
    data_dir: DataDir = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="worker processes (one ONNX session each)")
    ] = 1,
    beat: Annotated[
        bool,
        typer.Option(
            "--beat/--no-beat",
            help="also send the housekeeping pass (ready studies, stale jobs and sweeps) every "
            "CRGATE_ARRIVAL_SWEEP_SECONDS, from this worker's main process",
        ),
    ] = True,
    queues: Annotated[
        str,
        typer.Option(
            "--queues",
            help="which tasks this worker runs: classify (and compress), sweep (CR safety "
            "studies), forward (C-STORE to destinations), comma-separated",
        ),
    ] = "classify,sweep,forward",
) -> None:
    """Run Celery workers for jobs (needs CRGATE_BROKER_URL, e.g. Redis)."""
    settings = settings_from(data_dir=data_dir)
    configure_logging(settings)
    if not settings.broker_url:
        raise fail(
            "crgate worker needs a broker: set CRGATE_BROKER_URL (e.g. redis://127.0.0.1:6379/0);"
            " without one, `crgate serve` runs jobs in its own process",
            2,
        )
    from services.core.contracts import QUEUE_CLASSIFY, QUEUE_FORWARD, QUEUE_SWEEP
    from services.runtime.datadir import require_index
    from services.worker.app import configure

    try:
        require_index(settings)
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    names = {"classify": QUEUE_CLASSIFY, "sweep": QUEUE_SWEEP, "forward": QUEUE_FORWARD}
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown or not wanted:
        raise fail(
            f"--queues: unknown queue(s) {', '.join(unknown)}; use classify, sweep, forward", 2
        )
    argv = [
        "worker",
        f"--loglevel={settings.log_level.upper()}",
        f"--concurrency={concurrency}",
        "--pool=prefork",
        f"--queues={','.join(names[q] for q in wanted)}",
        "--without-gossip",
        "--without-mingle",
    ]
    configure(settings, housekeeping=beat).worker_main(argv)


def migrate(data_dir: DataDir = None) -> None:
    """Bring the index database to the newest schema, creating the data directory when there
    is none (compose runs this once before start)."""
    from services.runtime import open_index

    settings = settings_from(data_dir=data_dir)
    configure_logging(settings)
    try:
        index = open_index(settings, create=True)
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    index.engine.dispose()
    if index.created:
        err.print(f"created a new crgate data directory in {settings.data_dir.resolve()}")
    err.print("database schema is up to date")
    if index.key_file is not None:
        err.print(f"created the first admin key in {index.key_file} (mode 0600)")
