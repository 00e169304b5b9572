"""crgate's settings: the only reader of environment variables (prefix ``CRGATE_``)."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DuplicatePolicy(StrEnum):
    """What a second, different instance with an already stored SOP Instance UID does.

    The same data set again (in any transfer syntax) is always a duplicate: success, nothing
    rewritten. This policy is only about different content under a stored UID.
    """

    KEEP_FIRST = "keep-first"  # keep the stored one; answer with a warning (C-STORE 0xB000)
    REPLACE = "replace"  # store it; the old file is kept under <data-dir>/replaced/
    REFUSE = "refuse"  # refuse it with a clear reason (C-STORE 0xC010, STOW 0x0111)


class Settings(BaseSettings):
    """Every setting has a default that serves on one machine."""

    model_config = SettingsConfigDict(env_prefix="CRGATE_", extra="ignore")

    data_dir: Path = Field(Path("var"), description="where crgate keeps its files")
    threads: int = Field(0, ge=0, description="OpenJPEG threads per encode; 0 = every core")
    default_cr: float = Field(25.0, ge=1, description="CR used when none is given")
    log_level: str = Field("INFO", description="logging level")
    models_dir: Path = Field(
        default_factory=lambda: Path(__file__).resolve().parents[2] / "models",
        description="where model cards (*.json) and their ONNX files are",
    )
    default_model: str = Field("cnn3-phantom-v2", description="model used when none is named")
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty = SQLite at <data-dir>/crgate.db"
    )
    duplicate_policy: DuplicatePolicy = Field(
        DuplicatePolicy.KEEP_FIRST, description="same SOP Instance UID with different content"
    )
    http_port: int = Field(8080, ge=1, le=65535, description="HTTP port of `crgate api|serve`")
    http_host: str = Field("0.0.0.0", description="HTTP bind address")
    dicom_port: int = Field(11112, ge=1, le=65535, description="DICOM port of `crgate scp|serve`")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus /metrics port of `crgate scp`; 0 = off"
    )
    ae_title: str = Field("CRGATE", min_length=1, max_length=16, description="our AE title")
    allowed_ae: str = Field(
        "", description="comma-separated calling AE titles accepted; empty accepts any caller"
    )
    allowed_hosts: str = Field(
        "", description="comma-separated source addresses accepted; empty accepts any address"
    )
    max_upload_bytes: int = Field(
        2 * 1024**3, ge=1, description="largest STOW-RS request body accepted (413 above)"
    )
    http_body_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a STOW-RS body may send nothing before it is refused (408)",
    )
    max_inflated_bytes: int = Field(
        64 * 1024**2,
        ge=1024,
        description="largest size a deflated instance may inflate to (refused above: 413 in "
        "STOW-RS, 0xA700 in C-STORE)",
    )
    max_pdu_bytes: int = Field(
        4 * 1024**2,
        ge=16384,
        le=2**32 - 1,
        description="largest P-DATA PDU the SCP accepts (its Maximum Length; 0 = no limit is "
        "not allowed: one PDU is held in memory whole)",
    )
    dicom_acse_timeout: float = Field(
        10.0, gt=0, description="seconds the SCP waits for an association request or release"
    )
    dicom_network_timeout: float = Field(
        60.0, gt=0, description="seconds the SCP waits for data on an idle association"
    )
    max_frames_per_request: int = Field(
        1000, ge=1, description="most frame numbers one WADO-RS frames request may name"
    )
    console_cache_mb: int = Field(
        256,
        ge=0,
        le=1 << 20,
        description="MiB of decoded images the web console keeps for its panes and zooms "
        "(0 = none; a 13.6 MP mammogram is 26 MiB)",
    )
    anonymous_read: bool = Field(
        False, description="let requests without a key read DICOMweb (viewer role)"
    )
    broker_url: str = Field("", description="Celery broker URL; empty = in-process worker")
    job_stale_seconds: float = Field(
        60.0, gt=0, description="a running job with no heartbeat for this long is requeued"
    )
    job_soft_time_limit: int = Field(900, gt=0, description="seconds before a job is asked to stop")
    job_time_limit: int = Field(1200, gt=0, description="seconds before a job is killed")
    sweep_time_limit: int = Field(
        6 * 3600, gt=0, description="seconds before a CR safety study (sweep) is asked to stop"
    )
    broker_visibility_timeout: int = Field(
        1800, gt=0, description="seconds before an unacknowledged task is delivered again"
    )
    forward_to: str = Field(
        "",
        description="send every result's DICOM objects here by C-STORE: AET@host:port (kept "
        "as the destination named forward-to)",
    )
    forward_retry_seconds: float = Field(
        30.0,
        gt=0,
        description="first wait before a failed forward is tried again; doubled at each "
        "attempt, at most an hour",
    )
    forward_max_attempts: int = Field(
        8, ge=1, description="attempts at sending an object before its forward is failed"
    )
    arrival_sweep_seconds: float = Field(
        10.0,
        gt=0,
        description="the housekeeping interval: how often arrived studies (ready? quiet?) and "
        "stale jobs are checked (env CRGATE_ARRIVAL_SWEEP_SECONDS, name kept for users)",
    )
    retention_days: float = Field(
        0,
        ge=0,
        description="delete crgate's derived copies (compressed copies, overlays, SR) and "
        "result files older than this many days, in the worker's housekeeping; 0 = keep "
        "forever (originals are never deleted by retention)",
    )

    cors_origins: str = Field(
        "",
        description="comma-separated origins (scheme://host[:port]) whose pages may call the "
        "API with a Bearer key (CORS); empty allows none",
    )
    viewer_dir: Path | None = Field(
        None,
        description="an unpacked @ohif/app dist/ to serve under /viewer/ (`make viewer` makes "
        "build/ohif/dist); empty: no viewer",
    )
    session_hours: float = Field(
        8.0, gt=0, le=24 * 30, description="how long a browser session (/login) lasts"
    )
    session_secret: str = Field(
        "",
        description="key that signs session cookies; empty = <data-dir>/session.secret, "
        "created on first use (give every API process of one deployment the same)",
    )
    secure_cookies: bool = Field(
        False, description="mark session cookies Secure (set when crgate is reached over HTTPS)"
    )

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'crgate.db').resolve()}"

    @property
    def allowed_ae_titles(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.allowed_ae.split(",") if t.strip())

    @property
    def allowed_host_set(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.allowed_hosts.split(",") if t.strip())

    @property
    def cors_origin_set(self) -> frozenset[str]:
        """The CORS allow-list, each origin without a trailing slash."""
        return frozenset(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
