"""ObjectStore: content addressing, idempotence, no half-written objects, local and fsspec backends."""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path

import pytest

from driveloop.cloud.store import ObjectStore, is_sha256, segment_key, sha256_file
from driveloop.core.exceptions import StorageError


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return ObjectStore(tmp_path / "store")
    return ObjectStore(f"memory://store-{uuid.uuid4().hex}")


def test_put_returns_sha_and_key_layout(store: ObjectStore, tmp_path: Path) -> None:
    data = b"segment bytes" * 1000
    sha = store.put_file(_write(tmp_path / "a.mcap", data))
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.exists(sha)
    assert store.size(sha) == len(data)
    with store.open(sha) as f:
        assert f.read() == data
    assert store.url_of(sha).endswith(f"segments/{sha[:2]}/{sha}.mcap")
    assert store.shas() == [sha]


def test_put_is_idempotent(store: ObjectStore, tmp_path: Path) -> None:
    a = store.put_file(_write(tmp_path / "a.mcap", b"same"))
    b = store.put_file(_write(tmp_path / "b.mcap", b"same"))
    assert a == b
    assert store.shas() == [a]


def test_expected_sha_mismatch_stores_nothing(store: ObjectStore, tmp_path: Path) -> None:
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(StorageError, match="expected"):
        store.put_file(_write(tmp_path / "a.mcap", b"data"), expected_sha256=wrong)
    assert store.shas() == []


def test_local_store_leaves_no_temp_files(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store")
    with pytest.raises(StorageError):
        store.put_file(_write(tmp_path / "a.mcap", b"x"), expected_sha256="0" * 64)
    store.put_file(_write(tmp_path / "b.mcap", b"y"))
    names = [p.name for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert not [n for n in names if n.startswith(".tmp-")]
    assert len(names) == 1


def test_missing_object_is_a_storage_error(store: ObjectStore) -> None:
    sha = "ab" * 32
    assert not store.exists(sha)
    with pytest.raises(StorageError, match="no object"):
        store.open(sha)
    with pytest.raises(StorageError, match="no object"):
        store.size(sha)
    assert store.delete(sha) is False


def test_delete_and_copy_to(store: ObjectStore, tmp_path: Path) -> None:
    sha = store.put_file(_write(tmp_path / "a.mcap", b"payload"))
    out = io.BytesIO()
    assert store.copy_to(sha, out) == len(b"payload")
    assert out.getvalue() == b"payload"
    assert store.delete(sha) is True
    assert not store.exists(sha)


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "A" * 64, "g" * 64, "../" + "a" * 61, "a" * 65],
    ids=["empty", "short", "upper", "non-hex", "traversal", "long"],
)
def test_bad_digests_refused(bad: str, tmp_path: Path) -> None:
    assert not is_sha256(bad)
    with pytest.raises(StorageError, match="sha256"):
        segment_key(bad)
    store = ObjectStore(tmp_path / "s")
    with pytest.raises(StorageError):
        store.exists(bad)


def test_unreadable_source_and_bad_url(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot read"):
        sha256_file(tmp_path / "missing")
    with pytest.raises(StorageError):
        ObjectStore("nosuchprotocol://bucket/x")
    with pytest.raises(StorageError, match="empty"):
        ObjectStore("")
