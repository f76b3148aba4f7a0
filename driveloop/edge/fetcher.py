"""A python-tuf fetcher that resumes interrupted target downloads with HTTP Range requests.

Vehicles sit on flaky cellular links, so a 50 MB model must not restart from zero every time the
connection drops. Rules kept here:
- only *targets* are resumable: with consistent snapshots their URL basename starts with the sha256 of
  the content (``<sha256>.model.onnx``), so the partial file ``<download_dir>/<sha256>.part`` can only
  ever be a prefix of exactly that content; metadata is small and always fetched whole;
- received bytes are appended to the partial file before they are handed to TUF, and the partial file
  is fsynced when a transfer breaks, so a later call (even after a power cut) continues from there;
- a partial file is never trusted: TUF verifies length and hashes of the whole download, and the
  partial file is deleted once the stream completes (so a corrupted prefix costs one re-download, not a
  loop); a partial longer than the target's length, or a server that keeps streaming past it (endless
  data), is discarded and rejected with ``DownloadLengthMismatchError``;
- ``file://`` URLs read a local repository directory (the embedded, no-network mode).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse

import httpx
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

from driveloop.core.exceptions import ConfigError

logger = logging.getLogger(__name__)

_TARGET_BASENAME = re.compile(r"^([0-9a-f]{64})\.")
_HTTP_RANGE_NOT_SATISFIABLE = 416


class ResumableFetcher(FetcherInterface):
    """``FetcherInterface`` over httpx (or local files) with Range-based resume of targets."""

    def __init__(
        self,
        download_dir: Path,
        client: httpx.Client | None = None,
        timeout_s: float = 30.0,
        chunk_bytes: int = 64 * 1024,
        max_resumes: int = 32,
        resume_backoff_s: float = 0.0,
    ) -> None:
        if chunk_bytes <= 0 or max_resumes < 0 or timeout_s <= 0 or resume_backoff_s < 0:
            raise ConfigError("fetcher: chunk_bytes, timeout_s must be > 0; max_resumes, resume_backoff_s >= 0")
        self.download_dir = Path(download_dir)
        self._client = client
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.max_resumes = max_resumes
        self.resume_backoff_s = resume_backoff_s
        self.resumes = 0  # how many times a broken transfer was continued (observability)
        self._local = threading.local()

    @property
    def client(self) -> httpx.Client:
        """Created on first HTTP use: building one costs an SSL context, wasted in file:// mode."""
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout_s)
        return self._client

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO]:
        """As the base class, but tells ``_fetch`` the length bound (to cap partials and junk)."""
        self._local.max_length = max_length
        try:
            with super().download_file(url, max_length) as f:
                yield f
        finally:
            self._local.max_length = None

    def partial_path(self, url: str) -> Path | None:
        """Where a resumable download of ``url`` keeps its bytes; None if ``url`` is not a target."""
        m = _TARGET_BASENAME.match(url.rsplit("/", 1)[-1])
        return self.download_dir / f"{m.group(1)}.part" if m else None

    def _fetch(self, url: str) -> Iterator[bytes]:
        max_length = getattr(self._local, "max_length", None)
        if urlparse(url).scheme == "file":
            return self._local_chunks(Path(unquote(urlparse(url).path)))
        partial = self.partial_path(url)
        if partial is None or max_length is None:
            return self._plain_chunks(self._open(url, 0))
        self.download_dir.mkdir(parents=True, exist_ok=True)
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > max_length:
            logger.warning("partial %s longer than the target (%d > %d); discarding", partial.name, offset, max_length)
            partial.unlink()
            offset = 0
        resp, offset = self._open_resumed(url, partial, offset)
        return self._resumable_chunks(url, partial, offset, resp, max_length)

    # -- HTTP ---------------------------------------------------------------------------------
    def _open(self, url: str, offset: int) -> httpx.Response:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = self.client.send(self.client.build_request("GET", url, headers=headers), stream=True)
        except httpx.TimeoutException as e:
            raise tuf_exc.SlowRetrievalError(f"timed out connecting to {url}") from e
        except httpx.HTTPError as e:
            raise tuf_exc.DownloadError(f"cannot reach {url}: {e}") from e
        if resp.status_code >= 400 and resp.status_code != _HTTP_RANGE_NOT_SATISFIABLE:
            resp.close()
            raise tuf_exc.DownloadHTTPError(f"HTTP {resp.status_code} for {url}", resp.status_code)
        return resp

    def _open_resumed(self, url: str, partial: Path, offset: int) -> tuple[httpx.Response, int]:
        """Request from ``offset``; fall back to a full download if the server cannot resume."""
        resp = self._open(url, offset)
        if offset and resp.status_code != 206:
            # 200: server ignored Range; 416: our prefix is not a prefix of what it has. Start over.
            logger.info("server did not resume %s (HTTP %d); restarting", url, resp.status_code)
            resp.close()
            partial.unlink(missing_ok=True)
            return self._open(url, 0), 0
        return resp, offset

    def _plain_chunks(self, resp: httpx.Response) -> Iterator[bytes]:
        try:
            yield from resp.iter_bytes(self.chunk_bytes)
        except httpx.TimeoutException as e:
            raise tuf_exc.SlowRetrievalError(f"stalled reading {resp.url}") from e
        except httpx.HTTPError as e:
            raise tuf_exc.DownloadError(f"transfer of {resp.url} broke: {e}") from e
        finally:
            resp.close()

    def _resumable_chunks(
        self, url: str, partial: Path, offset: int, resp: httpx.Response, max_length: int
    ) -> Iterator[bytes]:
        if offset:
            logger.info("resuming %s at byte %d", url, offset)
            with open(partial, "rb") as f:
                while chunk := f.read(self.chunk_bytes):
                    yield chunk
        resumes = 0
        while True:
            try:
                with open(partial, "ab") as out:
                    try:
                        for chunk in resp.iter_bytes():  # no re-chunking: a chunker would lose its buffer on a cut
                            if offset + len(chunk) > max_length:
                                raise tuf_exc.DownloadLengthMismatchError(
                                    f"{url}: server sent more than the signed length {max_length}"
                                )
                            out.write(chunk)
                            offset += len(chunk)
                            yield chunk
                    finally:
                        out.flush()
                        os.fsync(out.fileno())
                        resp.close()
                partial.unlink(missing_ok=True)  # complete: TUF verifies it as a whole now
                return
            except tuf_exc.DownloadLengthMismatchError:
                partial.unlink(missing_ok=True)
                raise
            except httpx.HTTPError as e:
                if resumes >= self.max_resumes:
                    raise tuf_exc.DownloadError(f"{url}: gave up after {resumes} resumes: {e}") from e
                resumes += 1
                self.resumes += 1
                logger.info("transfer of %s broke at byte %d (%s); resuming", url, offset, type(e).__name__)
                if self.resume_backoff_s:
                    time.sleep(self.resume_backoff_s * resumes)
                resp = self._open(url, offset)
                if resp.status_code != 206:
                    resp.close()
                    partial.unlink(missing_ok=True)
                    raise tuf_exc.DownloadError(f"{url}: server stopped honouring Range (HTTP {resp.status_code})") from e

    # -- local directory (embedded mode) -------------------------------------------------------
    def _local_chunks(self, path: Path) -> Iterator[bytes]:
        if not path.is_file():
            raise tuf_exc.DownloadHTTPError(f"{path} not found", 404)  # like HTTP: root probing stops here
        with open(path, "rb") as f:
            while chunk := f.read(self.chunk_bytes):
                yield chunk
