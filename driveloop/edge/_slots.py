"""Pure A/B slot state machine of the vehicle updater (no files, no clock, no network).

Rules it keeps (Mender/RAUC style):
- ``active`` always names a slot holding a verified, committed model; nothing here can make it point at
  a slot that is not ``ready``;
- a new model is installed only into the inactive slot and only becomes ``pending`` after the install
  finished; the next boot tries it (a *trial*) and the health window then commits or reverts it;
- every boot of a pending slot counts an attempt *before* the model runs; after ``max_boot_attempts``
  boots without a commit the slot is abandoned (``failed``) and the committed slot boots — so crashes
  during the health window can never loop;
- ``committed_seq`` is the highest release sequence ever committed: the rollback floor.
Every transition returns a new state; the updater persists it atomically before acting on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from driveloop.core.exceptions import ConfigError, OtaError

SlotName = Literal["a", "b"]
SLOT_NAMES: tuple[SlotName, SlotName] = ("a", "b")
SLOT_STATUSES = ("empty", "installing", "ready", "failed")


@dataclass(frozen=True)
class Slot:
    status: str = "empty"
    version: str | None = None
    sha256: str | None = None
    release_seq: int = 0

    def __post_init__(self) -> None:
        if self.status not in SLOT_STATUSES:
            raise ConfigError(f"unknown slot status {self.status!r}")


@dataclass(frozen=True)
class BootState:
    a: Slot
    b: Slot
    active: SlotName = "a"
    pending: SlotName | None = None
    trial: bool = False  # booted into ``pending``; its health window is open
    attempts: int = 0  # boots of ``pending`` so far
    max_boot_attempts: int = 3
    committed_seq: int = 0
    last_event: str = "provisioned"

    def __post_init__(self) -> None:
        if self.max_boot_attempts < 1:
            raise ConfigError(f"max_boot_attempts must be >= 1, got {self.max_boot_attempts}")
        if self.active not in SLOT_NAMES or self.pending not in (*SLOT_NAMES, None):
            raise ConfigError(f"bad slot names active={self.active!r} pending={self.pending!r}")
        if self.slot(self.active).status != "ready":
            raise OtaError(f"boot state invalid: active slot {self.active} is {self.slot(self.active).status}")
        if self.pending == self.active or self.trial and self.pending is None:
            raise OtaError("boot state invalid: pending must be the inactive slot, a trial needs a pending slot")

    def slot(self, name: SlotName) -> Slot:
        return self.a if name == "a" else self.b

    @property
    def inactive(self) -> SlotName:
        return "b" if self.active == "a" else "a"

    @property
    def running(self) -> SlotName:
        """The slot the current boot runs: the pending one during a trial, else the active one."""
        return self.pending if self.trial and self.pending else self.active

    def with_slot(self, name: SlotName, slot: Slot, **changes: Any) -> BootState:
        changes[name] = slot
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BootState:
        try:
            return cls(**{**d, "a": Slot(**d["a"]), "b": Slot(**d["b"])})
        except (TypeError, KeyError) as e:
            raise OtaError(f"boot state is malformed: {e}") from e


def initial(version: str, sha256: str, release_seq: int = 0, max_boot_attempts: int = 3) -> BootState:
    """Factory state: the provisioned model committed in slot a, slot b empty."""
    return BootState(
        a=Slot("ready", version, sha256, release_seq),
        b=Slot(),
        max_boot_attempts=max_boot_attempts,
        committed_seq=release_seq,
    )


def begin_install(s: BootState, version: str, sha256: str, release_seq: int) -> tuple[BootState, SlotName]:
    """Claim the inactive slot for a download (cancels a pending-but-untried switch)."""
    if s.trial:
        raise OtaError("cannot install while a new model is on trial; commit or revert it first")
    target = s.inactive
    return s.with_slot(target, Slot("installing", version, sha256, release_seq), pending=None, attempts=0,
                       last_event=f"installing {version} into {target}"), target


def finish_install(s: BootState, name: SlotName, version: str, sha256: str) -> BootState:
    """The slot's files are written and verified: it may be switched to."""
    slot = s.slot(name)
    if slot.status != "installing" or slot.version != version or slot.sha256 != sha256 or name == s.active:
        raise OtaError(f"slot {name} is not installing {version} (it is {slot.status} {slot.version})")
    return s.with_slot(name, replace(slot, status="ready"), last_event=f"installed {version} in {name}")


def request_switch(s: BootState) -> BootState:
    """Mark the inactive, ready slot to be tried on the next boot."""
    target = s.inactive
    if s.slot(target).status != "ready":
        raise OtaError(f"nothing to switch to: slot {target} is {s.slot(target).status}")
    if s.trial:
        raise OtaError("a model is already on trial")
    return replace(s, pending=target, attempts=0, last_event=f"switch to {target} on next boot")


def on_boot(s: BootState) -> tuple[BootState, SlotName]:
    """Decide which slot this boot runs, counting the attempt before the model runs."""
    if s.pending is None:
        return replace(s, trial=False, attempts=0, last_event=f"boot {s.active}"), s.active
    if s.attempts >= s.max_boot_attempts:
        abandoned = replace(s.slot(s.pending), status="failed")
        return s.with_slot(s.pending, abandoned, pending=None, trial=False, attempts=0,
                           last_event=f"abandoned {s.pending} after {s.attempts} boots; boot {s.active}"), s.active
    return replace(s, trial=True, attempts=s.attempts + 1,
                   last_event=f"trial boot {s.attempts + 1}/{s.max_boot_attempts} of {s.pending}"), s.pending


def commit(s: BootState) -> BootState:
    """The health window passed: the trial slot becomes the committed one (the old one stays as fallback)."""
    if not s.trial or s.pending is None:
        raise OtaError("nothing to commit: no model is on trial")
    seq = max(s.committed_seq, s.slot(s.pending).release_seq)
    return replace(s, active=s.pending, pending=None, trial=False, attempts=0, committed_seq=seq,
                   last_event=f"committed {s.slot(s.pending).version}")


def revert(s: BootState, reason: str) -> BootState:
    """The health window failed (or an operator asked): drop the pending slot, keep the committed one."""
    if s.pending is None:
        raise OtaError("nothing to revert: no model is pending or on trial")
    failed = replace(s.slot(s.pending), status="failed")
    return s.with_slot(s.pending, failed, pending=None, trial=False, attempts=0,
                       last_event=f"reverted {failed.version}: {reason}")


def mark_corrupt(s: BootState, name: SlotName) -> BootState:
    """A slot's bytes no longer match its recorded hash: never boot it again."""
    if name == s.active:
        other = s.slot(s.inactive)
        if other.status != "ready":
            raise OtaError(f"active slot {name} is corrupt and slot {s.inactive} holds no verified model")
        bad = replace(s.slot(name), status="failed")
        return s.with_slot(name, bad, active=s.inactive, pending=None, trial=False, attempts=0,
                           last_event=f"slot {name} corrupt; fell back to {s.inactive}")
    bad = replace(s.slot(name), status="failed")
    pending = None if s.pending == name else s.pending
    return s.with_slot(name, bad, pending=pending, trial=s.trial and pending is not None,
                       attempts=s.attempts if pending else 0, last_event=f"slot {name} corrupt")
