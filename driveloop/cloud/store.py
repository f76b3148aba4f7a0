"""Content-addressed object store for segments (DESIGN.md: object store, local directory → ``s3://``).

Every object lives under the key ``segments/<sha[:2]>/<sha>.mcap`` where ``sha`` is the sha256 of its
bytes, so storing the same segment twice is a no-op and a key can never point at other bytes.
Rules it keeps:
- Nothing is half-written. On a local directory the bytes go to a temp file beside the key, are
  fsynced, then ``os.replace``d into place (and the directory fsynced); a crash leaves at most a
  ``.tmp-*`` file that no key names. Object stores (S3, …) make a PUT visible only when complete, so
  there the object is written to its final key directly.
- The hash is computed from the bytes actually written, never trusted from the caller; an
  ``expected_sha256`` that differs is refused and nothing is stored.
- S3 (``s3://bucket/prefix``; the endpoint and credentials come from the standard AWS variables,
  ``AWS_ENDPOINT_URL`` for an S3-compatible server): objects of at least two parts go up as multipart
  uploads of ``part_size_bytes`` (a failed one is aborted, so no partial object ever appears); transient
  failures (a dropped connection, a throttle, a 5xx) are retried by the client up to ``max_attempts``
  times with backoff; a missing bucket is refused when the store is opened, and every failure reaches
  the caller as one StorageError line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from driveloop.core.atomic import file_sha256, fsync_dir
from driveloop.core.exceptions import StorageError

logger = logging.getLogger(__name__)

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_COPY_BLOCK_BYTES = 1 << 20  # 1 MiB: large enough for throughput, small enough for memory
SEGMENT_PREFIX = "segments"
S3_MIN_PART_BYTES = 5 * 2**20  # S3's smallest part (all but the last)
S3_PART_BYTES = 8 * 2**20
S3_MAX_ATTEMPTS = 5


def is_sha256(value: str) -> bool:
    """True for a lowercase hex sha256 digest (the only form keys and the catalog use)."""
    return bool(_SHA_RE.match(value))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a local file, streamed so large segments never sit in memory."""
    try:
        return file_sha256(path, _COPY_BLOCK_BYTES)
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e}") from e


def segment_key(sha256: str) -> str:
    """Relative key of a segment object: ``segments/<sha[:2]>/<sha>.mcap``."""
    if not is_sha256(sha256):
        raise StorageError(f"not a sha256 digest: {sha256!r}")
    return f"{SEGMENT_PREFIX}/{sha256[:2]}/{sha256}.mcap"


class ObjectStore:
    """Segments by sha256 over fsspec: a plain path or ``file://`` is a local directory, any other
    URL (``s3://bucket/prefix``, ``memory://…``) goes to that fsspec filesystem."""

    def __init__(self, url: str | os.PathLike[str], *, part_size_bytes: int = S3_PART_BYTES,
                 max_attempts: int = S3_MAX_ATTEMPTS) -> None:
        url = str(url)
        if not url:
            raise StorageError("object store URL is empty")
        if part_size_bytes < S3_MIN_PART_BYTES or max_attempts < 1:
            raise StorageError(f"part_size_bytes must be >= {S3_MIN_PART_BYTES} and max_attempts >= 1")
        self._s3 = url.startswith(("s3://", "s3a://"))
        options: dict[str, object] = {}
        if self._s3:  # bounded retries with backoff, and no request hanging forever
            options["config_kwargs"] = {"retries": {"max_attempts": max_attempts, "mode": "standard"},
                                        "connect_timeout": 10, "read_timeout": 60}
        try:
            self._fs, root = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError) as e:  # unknown protocol or missing driver (e.g. s3fs)
            raise StorageError(f"cannot open object store {url!r}: {e}") from e
        self.url = url
        self.part_size_bytes = part_size_bytes
        self._local = isinstance(self._fs, LocalFileSystem)
        self._root = root.rstrip("/")
        if self._local:
            Path(self._root).mkdir(parents=True, exist_ok=True)
        elif self._s3:
            self._check_bucket()

    def _check_bucket(self) -> None:
        """Refuse a store whose bucket does not exist (or cannot be reached) now, in one line, rather than
        at the first upload with the S3 client's error."""
        bucket = self._root.split("/", 1)[0]
        try:  # HEAD on the bucket itself: s3fs's exists() reads an unreachable endpoint as "no such bucket"
            self._fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError as e:
            raise StorageError(f"object store {self.url}: bucket {bucket!r} does not exist (create it first)") from e
        except Exception as e:  # noqa: BLE001 - the S3 client's errors are not OSErrors: one line, whatever it is
            raise StorageError(f"cannot reach object store {self.url}: {_one_line(e)}") from e

    @property
    def is_local(self) -> bool:
        return self._local

    def _path(self, sha256: str) -> str:
        return f"{self._root}/{segment_key(sha256)}"

    def url_of(self, sha256: str) -> str:
        """Where readers (``ray.data.read_mcap``, Foxglove) find the object: a local path or a URL."""
        path = self._path(sha256)
        return path if self._local else str(self._fs.unstrip_protocol(path))

    def exists(self, sha256: str) -> bool:
        try:
            return bool(self._fs.exists(self._path(sha256)))
        except Exception as e:  # noqa: BLE001 - the S3 client's errors are not all OSErrors
            raise StorageError(f"cannot reach object store {self.url}: {_one_line(e)}") from e

    def size(self, sha256: str) -> int:
        try:
            return int(self._fs.size(self._path(sha256)))
        except FileNotFoundError as e:
            raise StorageError(f"no object {sha256} in {self.url}") from e

    def open(self, sha256: str) -> BinaryIO:
        """Open an object for reading (binary); a missing object is a StorageError."""
        try:
            return self._fs.open(self._path(sha256), "rb")  # type: ignore[no-any-return]
        except FileNotFoundError as e:
            raise StorageError(f"no object {sha256} in {self.url}") from e
        except Exception as e:  # noqa: BLE001 - the S3 client's errors are not all OSErrors
            raise StorageError(f"cannot read {sha256} from {self.url}: {_one_line(e)}") from e

    def put_file(self, path: str | os.PathLike[str], expected_sha256: str | None = None) -> str:
        """Store a local file under its sha256 and return it; storing known bytes again is a no-op."""
        if expected_sha256 is not None and not is_sha256(expected_sha256):
            raise StorageError(f"not a sha256 digest: {expected_sha256!r}")
        if self._local:
            return self._put_local(Path(path), expected_sha256)
        return self._put_remote(Path(path), expected_sha256)

    def _put_local(self, src: Path, expected: str | None) -> str:
        tmp_dir = Path(self._root) / SEGMENT_PREFIX
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=tmp_dir)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                for block in iter(lambda: f.read(_COPY_BLOCK_BYTES), b""):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            _check_expected(sha, expected, src)
            final = Path(self._path(sha))
            if final.exists():
                tmp.unlink()
                return sha
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            logger.debug("stored %s (%s)", sha, src)
            return sha
        except OSError as e:
            raise StorageError(f"cannot store {src} in {self.url}: {e}") from e
        finally:
            if tmp.exists():
                tmp.unlink()

    def _put_remote(self, src: Path, expected: str | None) -> str:
        sha = sha256_file(src)
        _check_expected(sha, expected, src)
        key = self._path(sha)
        extra = {"chunksize": self.part_size_bytes} if self._s3 else {}
        try:
            if not self._fs.exists(key):
                self._fs.put_file(str(src), key, **extra)  # multipart from two parts on: aborted on failure
                if int(self._fs.size(key)) != src.stat().st_size:
                    self._fs.rm(key)
                    raise StorageError(f"object {sha} in {self.url} has the wrong size after upload")
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - OSError, or the S3 client's own errors after its retries
            raise StorageError(f"cannot store {src.name} in {self.url}: {_one_line(e)}") from e
        logger.debug("stored %s (%s)", sha, src)
        return sha

    def copy_to(self, sha256: str, dest: IO[bytes]) -> int:
        """Stream an object into an open binary file; returns the number of bytes copied."""
        with self.open(sha256) as f:
            before = dest.tell() if dest.seekable() else 0
            try:
                shutil.copyfileobj(f, dest, _COPY_BLOCK_BYTES)
            except Exception as e:  # noqa: BLE001 - a read cut off mid-object, whatever the client raises
                raise StorageError(f"cannot read {sha256} from {self.url}: {_one_line(e)}") from e
            return (dest.tell() - before) if dest.seekable() else self.size(sha256)

    def delete(self, sha256: str) -> bool:
        """Remove an object (used to undo a store whose catalog entry failed); False if absent."""
        path = self._path(sha256)
        if not self._fs.exists(path):
            return False
        self._fs.rm(path)
        return True

    def shas(self) -> list[str]:
        """Every stored sha256, sorted (for audits and tests)."""
        pattern = f"{self._root}/{SEGMENT_PREFIX}/*/*.mcap"
        found = [p.rsplit("/", 1)[-1].removesuffix(".mcap") for p in self._fs.glob(pattern)]
        return sorted(s for s in found if is_sha256(s))


def _one_line(e: BaseException) -> str:
    """An error of a storage client as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else 'no detail'}"


def _check_expected(sha: str, expected: str | None, src: Path) -> None:
    if expected is not None and sha != expected:
        raise StorageError(f"{src}: sha256 is {sha}, expected {expected}")
