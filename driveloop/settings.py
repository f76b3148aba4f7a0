"""Typed settings at the outer edge: environment variables (``DRIVELOOP_*`` and the few standard ones)
choose between the embedded defaults and scale-out services. Inner packages never read the
environment; the CLI passes them explicit paths and URLs from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRIVELOOP_", extra="ignore", frozen=True)

    home: Path = Field(default=Path(".driveloop"), description="Data directory holding everything.")
    ray_address: str | None = Field(default=None, validation_alias=AliasChoices("RAY_ADDRESS", "DRIVELOOP_RAY_ADDRESS"))
    catalog_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite under home.")
    fleet_db_url: str | None = Field(default=None, description="The fleet server's SQLAlchemy URL; default SQLite "
                                     "under home. PostgreSQL lets several `ota serve` replicas share it.")
    store_url: str | None = Field(default=None, description="fsspec URL; default a directory under home.")
    cloud_url: str | None = Field(default=None, description="Ingest server URL; default the embedded local cloud.")
    cloud_token: str | None = None
    ota_url: str | None = None
    ca_file: Path | None = Field(default=None, description="CA certificate the cloud and fleet servers' HTTPS "
                                 "certificates must chain to (default: the system's CAs).")
    prometheus_url: str | None = Field(default=None, validation_alias=AliasChoices("PROMETHEUS_URL", "DRIVELOOP_PROMETHEUS_URL"))
    num_cpus: int = Field(default=2, ge=1, description="CPUs Ray and torch may use on this machine.")
    campaign_auto_approve: str = Field(default="", description="Scenario classes whose shift campaigns the loop "
                                       "may approve by itself ('*': any, '': none; cloud.shift.ApprovalPolicy).")
    nats_url: str | None = Field(default=None, description="URL(s) of a NATS JetStream cluster (comma-separated); "
                                 "default: an embedded nats-server under home/nats.")
    sim_backend: Literal["auto", "ray", "local"] = Field(
        default="auto", description="Where simulation and evaluation episodes run: auto (Ray when RAY_ADDRESS "
        "is set), ray (also a local Ray runtime) or local (this process).")

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
    def nats_dir(self) -> Path:
        return self.home / "nats"

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
    """The settings from the environment; a bad value is one ConfigError naming the variable."""
    from pydantic import ValidationError

    from driveloop.core.exceptions import ConfigError

    try:
        return Settings()
    except ValidationError as e:
        first = e.errors()[0]
        name = "DRIVELOOP_" + "_".join(str(x) for x in first.get("loc", ())).upper()
        raise ConfigError(f"bad setting {name}: {first.get('msg', 'invalid')}") from e
