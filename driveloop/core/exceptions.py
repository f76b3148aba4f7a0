"""The one error tree of driveloop. A leaf module: it imports nothing, so every package may use it.

    DriveloopError                 exit 1 unless a subclass says otherwise
    ├── ConfigError                bad settings, flags or config values (exit 2)
    ├── SafetyError                safety-layer contract violated (bad limits, bad inputs)
    ├── ScenarioError              unknown or malformed scenario name (exit 2)
    ├── ModelError                 model artifact unusable
    │   ├── IntegrityError         sha256 does not match the manifest
    │   └── ContractError          model I/O names/shapes/dtypes differ from the contract
    ├── RegistryError              model registry: unknown version, illegal stage change
    │   └── NoModelError           no released or validated model to drive or fine-tune from
    ├── SegmentError               MCAP segment corrupt, truncated, or of the wrong schema
    ├── StorageError               object store / catalog failures
    ├── UploadError                transport failures while uploading segments
    │   ├── UploadRejectedError    the receiver refused for good (bad bytes, bad request)
    │   └── QuotaExceededError     a per-vehicle quota is full: retry after ``retry_after_s`` (HTTP 429)
    ├── PipelineError              a cloud pipeline stage failed
    ├── FederatedError             federated run failed (no quorum in any round, bad update)
    ├── StreamError                a live-stream message or the broker is unusable (malformed, oversized,
    │                              wrong subject; the broker cannot start)
    └── OtaError                   OTA release, update or rollout failure
        ├── SignatureError         metadata or target not signed by a trusted key
        ├── RollbackAttackError    offered metadata/model older than the installed one
        └── RolloutStateError      illegal rollout transition (e.g. promote during abort)

Errors that reach the CLI are printed as one line, and the process exits with ``exit_code``.
"""

from __future__ import annotations


class DriveloopError(Exception):
    """Root of every error driveloop raises on purpose."""

    exit_code: int = 1


class ConfigError(DriveloopError):
    exit_code = 2


class SafetyError(DriveloopError):
    exit_code = 3


class ScenarioError(DriveloopError):
    exit_code = 2


class ModelError(DriveloopError):
    exit_code = 4


class IntegrityError(ModelError):
    pass


class ContractError(ModelError):
    pass


class RegistryError(DriveloopError):
    exit_code = 4


class NoModelError(RegistryError):
    """The registry holds no released or validated model (``Registry.resolve`` without a ref)."""


class SegmentError(DriveloopError):
    exit_code = 5


class StorageError(DriveloopError):
    exit_code = 5


class UploadError(DriveloopError):
    exit_code = 6


class PipelineError(DriveloopError):
    exit_code = 7


class FederatedError(DriveloopError):
    exit_code = 8


class OtaError(DriveloopError):
    exit_code = 9


class StreamError(DriveloopError):
    """A live-stream message that fails its contract (dropped and counted by whoever received it), or
    a broker that cannot be started or reached by a command that needs it."""

    exit_code = 11


class SignatureError(OtaError):
    pass


class RollbackAttackError(OtaError):
    pass


class RolloutStateError(OtaError):
    pass


class AuthError(DriveloopError):
    """Unknown or bad credentials (HTTP 401), or a caller acting outside its rights (HTTP 403:
    disabled vehicle, another vehicle's upload, an admin-only action)."""

    exit_code = 10

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


class UploadRejectedError(UploadError):
    """The receiver refused a request for good (wrong hash, oversized, bad offset, bad input):
    resending the same bytes cannot succeed, unlike a dropped connection. ``status`` is the HTTP
    code; ``offset`` is the server's offset when the request was refused for a wrong offset."""

    def __init__(self, message: str, status: int = 422, offset: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.offset = offset


class QuotaExceededError(UploadError):
    """A per-vehicle quota (open uploads, staged bytes, bytes per hour) is full. Unlike a rejection
    this passes: the same request succeeds after ``retry_after_s`` (HTTP 429 + ``Retry-After``)."""

    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))


class StaleReportError(OtaError):
    """A vehicle report that is not newer than the last one accepted (seq not increasing): a replay
    or a reordered delivery (HTTP 409)."""
