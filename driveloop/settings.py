"""Typed settings at the outer edge: environment variables (``DRIVELOOP_*`` and the few standard ones)
choose between the embedded defaults and scale-out services. Inner packages never read the
environment; the CLI passes them explicit paths and URLs from here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRIVELOOP_", extra="ignore", frozen=True)

    home: Path = Field(default=Path(".driveloop"), description="Data directory holding everything.")
    ray_address: str | None = Field(default=None, validation_alias=AliasChoices("RAY_ADDRESS", "DRIVELOOP_RAY_ADDRESS"))
    catalog_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite under home.")
    store_url: str | None = Field(default=None, description="fsspec URL; default a directory under home.")
    cloud_url: str | None = Field(default=None, description="Ingest server URL; default the embedded local cloud.")
    cloud_token: str | None = None
    ota_url: str | None = None
    ca_file: Path | None = Field(default=None, description="CA certificate the cloud and fleet servers' HTTPS "
                                 "certificates must chain to (default: the system's CAs).")
    prometheus_url: str | None = Field(default=None, validation_alias=AliasChoices("PROMETHEUS_URL", "DRIVELOOP_PROMETHEUS_URL"))
    num_cpus: int = Field(default=2, ge=1, description="CPUs Ray and torch may use on this machine.")

    @property
    def registry_dir(self) -> Path:
        return self.home / "registry"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def cloud_dir(self) -> Path:
        return self.home / "cloud"

    @property
    def ota_dir(self) -> Path:
        return self.home / "ota"

    @property
    def fleet_dir(self) -> Path:
        return self.home / "fleet"

    def resolved_catalog_url(self) -> str:
        return self.catalog_url or f"sqlite:///{(self.cloud_dir / 'catalog.db').resolve()}"

    def resolved_store_url(self) -> str:
        return self.store_url or str((self.cloud_dir / "store").resolve())


def load_settings() -> Settings:
    return Settings()
