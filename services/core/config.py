"""crgate's settings: the only reader of environment variables (prefix ``CRGATE_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    default_model: str = Field("cnn3-phantom-v1", description="model used when none is named")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
