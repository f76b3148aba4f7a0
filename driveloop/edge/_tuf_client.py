"""The vehicle's python-tuf boundary, shared by its two clients (image repository and director).

- :func:`tuf_errors` turns python-tuf's errors into driveloop's OTA errors, with what happened;
- :func:`repo_urls` gives the metadata and targets URLs of a repository (http(s) URL or a directory);
- :func:`open_updater` starts a fresh python-tuf ``Updater`` (one refresh each) from the newest
  intact cached root, else the provisioned anchor (a power cut may tear python-tuf's cache).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from driveloop.core.exceptions import OtaError, RollbackAttackError, SignatureError

logger = logging.getLogger(__name__)


@contextmanager
def tuf_errors(what: str) -> Iterator[None]:
    """Translate python-tuf errors into driveloop's OTA errors with a message that says what happened."""
    try:
        yield
    except tuf_exc.UnsignedMetadataError as e:
        raise SignatureError(f"{what}: metadata not signed by a trusted key ({e})") from e
    except tuf_exc.BadVersionNumberError as e:
        raise RollbackAttackError(f"{what}: metadata version rollback or mix-and-match ({e})") from e
    except tuf_exc.ExpiredMetadataError as e:
        raise OtaError(f"{what}: metadata expired — stale repository or freeze attack ({e})") from e
    except tuf_exc.LengthOrHashMismatchError as e:
        raise SignatureError(f"{what}: bytes do not match the signed length/hashes — tampered ({e})") from e
    except tuf_exc.DownloadLengthMismatchError as e:
        raise OtaError(f"{what}: server sent more data than signed (endless data attack) ({e})") from e
    except tuf_exc.RepositoryError as e:
        raise OtaError(f"{what}: repository metadata rejected ({type(e).__name__}: {e})") from e
    except tuf_exc.DownloadError as e:
        raise OtaError(f"{what}: download failed ({e})") from e


def repo_urls(repo: str | Path) -> tuple[str, str]:
    """Metadata and targets base URLs of a repository given as http(s) URL or a local directory."""
    s = str(repo)
    if not s.startswith(("http://", "https://", "file://")):
        s = Path(s).resolve().as_uri()
    s = s.rstrip("/")
    return f"{s}/metadata/", f"{s}/targets/"


def trusted_root(cache_dir: Path, anchor: Path) -> bytes:
    """Newest root python-tuf cached that still parses, else the provisioned anchor.

    python-tuf persists roots without fsync and re-creates its ``root.json`` link on every refresh, so
    after a power cut the cache may be torn or the link missing; the roots it did store were verified
    through the chain before they were written, so the newest intact one is a safe bootstrap, and the
    factory anchor is the last resort.
    """
    history = cache_dir / "root_history"
    cached = sorted(history.glob("*.root.json"), key=lambda p: int(p.name.split(".")[0]), reverse=True) \
        if history.is_dir() else []
    for path in cached:
        data = path.read_bytes()
        try:
            Metadata.from_bytes(data)
            return data
        except tuf_exc.RepositoryError:
            logger.warning("cached root %s is unreadable; trying an older one", path.name)
    try:
        return anchor.read_bytes()
    except FileNotFoundError as e:
        raise OtaError(f"no trusted root at {anchor}; provision the vehicle first") from e


def open_updater(cache_dir: Path, anchor: Path, repo: str | Path, fetcher: FetcherInterface,
                 target_dir: Path | None = None) -> Updater:
    """A fresh python-tuf client of ``repo`` whose trusted metadata lives in ``cache_dir``."""
    metadata_url, targets_url = repo_urls(repo)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tuf_errors("loading the trusted root"):
        return Updater(str(cache_dir), metadata_url, str(target_dir) if target_dir else None,
                       targets_url if target_dir else None, fetcher, bootstrap=trusted_root(cache_dir, anchor))
