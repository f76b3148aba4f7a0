"""Collection campaigns (modelled on AWS IoT FleetWise): what vehicles should record and upload.

A campaign is a condition over the recorder's signals (``ttc < 1.5 or fallback``), a trigger mode
(``always``: every tick the condition holds; ``rising_edge``: only when it becomes true), a minimum
interval between triggers, a window of data kept before/after a trigger, a priority and an expiry.
Lifecycle: ``created`` in the cloud → ``approved`` by a person → fetched by vehicles while unexpired →
converted into the recorder's :class:`edge.triggers.TriggerSpec` so the recorder applies it.

Rules it keeps: the condition is parsed by the recorder's own safe expression parser
(``edge.triggers.compile_condition``) when the campaign is created, so a campaign the vehicle could not
run is refused in the cloud (ConfigError → HTTP 422); everything here is pure (``now_s`` passed in).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from driveloop.core.exceptions import ConfigError

if TYPE_CHECKING:
    from driveloop.edge.triggers import TriggerSpec

TRIGGER_MODES = ("always", "rising_edge")
STATE_CREATED = "created"
STATE_APPROVED = "approved"
STATES = (STATE_CREATED, STATE_APPROVED)
MAX_WINDOW_S = 60.0  # a window longer than three 20 s segments would keep nearly everything
PRIORITY_RANGE = (1, 9)  # the recorder's scale: higher is more urgent, 0 is routine data
TRIGGER_PREFIX = "campaign."
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,53}$")  # + TRIGGER_PREFIX fits the trigger's 64 chars
_ID_RE = re.compile(r"^cmp-[0-9a-f]{12}$")


def _finite_at_least(value: object, low: float, what: str, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (high is not None and v > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{what} must be finite and {bound}, got {value!r}")
    return v


@dataclass(frozen=True)
class CampaignSpec:
    """What to collect. ``priority`` uses the recorder's 1..9 scale (higher is more urgent: its
    event segments upload first); ``expires_at_s`` is Unix time in seconds, None for never."""

    name: str
    condition: str
    trigger_mode: str = "rising_edge"
    min_interval_s: float = 5.0
    pre_window_s: float = 5.0
    post_window_s: float = 5.0
    priority: int = 3
    expires_at_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigError(f"campaign name must match {_NAME_RE.pattern}, got {self.name!r}")
        if not isinstance(self.condition, str) or not self.condition.strip():
            raise ConfigError("campaign condition must be a non-empty expression")
        compile_campaign_condition(self.condition)
        if self.trigger_mode not in TRIGGER_MODES:
            raise ConfigError(f"trigger_mode must be one of {TRIGGER_MODES}, got {self.trigger_mode!r}")
        object.__setattr__(self, "min_interval_s", _finite_at_least(self.min_interval_s, 0.0, "min_interval_s"))
        for name in ("pre_window_s", "post_window_s"):
            object.__setattr__(self, name, _finite_at_least(getattr(self, name), 0.0, name, MAX_WINDOW_S))
        low, high = PRIORITY_RANGE
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or not low <= self.priority <= high:
            raise ConfigError(f"priority must be an integer in [{low}, {high}], got {self.priority!r}")
        if self.expires_at_s is not None:
            object.__setattr__(self, "expires_at_s", _finite_at_least(self.expires_at_s, 0.0, "expires_at_s"))


@dataclass(frozen=True)
class Campaign:
    """A campaign as the cloud keeps it: the spec plus its identity and approval state."""

    id: str
    spec: CampaignSpec
    state: str
    created_at_s: float
    approved_at_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID_RE.match(self.id):
            raise ConfigError(f"campaign id must match {_ID_RE.pattern}, got {self.id!r}")
        if self.state not in STATES:
            raise ConfigError(f"campaign state must be one of {STATES}, got {self.state!r}")
        if (self.state == STATE_APPROVED) != (self.approved_at_s is not None):
            raise ConfigError("approved_at_s is set exactly when a campaign is approved")

    def is_active(self, now_s: float) -> bool:
        """Vehicles run a campaign only once approved and until it expires."""
        expires = self.spec.expires_at_s
        return self.state == STATE_APPROVED and (expires is None or now_s < expires)


def compile_campaign_condition(text: str) -> Any:
    """Parse a condition with the recorder's safe parser, against the signals a vehicle really
    provides (a typo is refused here, not silently false on the fleet); failures are ConfigError."""
    from driveloop.edge.triggers import SIGNAL_NAMES, compile_condition

    try:
        return compile_condition(text, SIGNAL_NAMES)
    except ConfigError:
        raise
    except Exception as e:  # the parser promises ConfigError; anything else is still bad input
        raise ConfigError(f"malformed campaign condition {text!r}: {e}") from e


def new_campaign(spec: CampaignSpec, now_s: float, campaign_id: str | None = None) -> Campaign:
    """A freshly created, not yet approved campaign; one that is already expired is refused."""
    if spec.expires_at_s is not None and spec.expires_at_s <= now_s:
        raise ConfigError(f"campaign {spec.name!r} expires before it is created")
    return Campaign(campaign_id or f"cmp-{uuid.uuid4().hex[:12]}", spec, STATE_CREATED, float(now_s))


def approve(campaign: Campaign, now_s: float) -> Campaign:
    """created → approved. Approving twice or approving an expired campaign is refused."""
    if campaign.state == STATE_APPROVED:
        raise ConfigError(f"campaign {campaign.id} is already approved")
    expires = campaign.spec.expires_at_s
    if expires is not None and expires <= now_s:
        raise ConfigError(f"campaign {campaign.id} has expired; create a new one")
    return replace(campaign, state=STATE_APPROVED, approved_at_s=float(now_s))


def active_campaigns(campaigns: Iterable[Campaign], now_s: float) -> list[Campaign]:
    """The campaigns a vehicle should run now, most urgent first (priority, then age)."""
    active = [c for c in campaigns if c.is_active(now_s)]
    return sorted(active, key=lambda c: (-c.spec.priority, c.created_at_s, c.id))


_SPEC_FIELDS = {f.name for f in fields(CampaignSpec)}


def spec_from_json(payload: object) -> CampaignSpec:
    """A CampaignSpec from untrusted JSON (the admin API, the CLI); unknown keys are refused."""
    if not isinstance(payload, Mapping):
        raise ConfigError("a campaign must be a JSON object")
    unknown = set(payload) - _SPEC_FIELDS
    if unknown:
        raise ConfigError(f"unknown campaign fields: {sorted(unknown)}")
    missing = {"name", "condition"} - set(payload)
    if missing:
        raise ConfigError(f"campaign is missing {sorted(missing)}")
    return CampaignSpec(**dict(payload))


def to_wire(campaign: Campaign) -> dict[str, Any]:
    """The JSON a vehicle receives from ``GET /v1/campaigns``: the campaign, plus under ``trigger``
    the recorder TriggerSpec's fields derived from it (the vehicle rebuilds and re-checks it)."""
    trigger = to_trigger_spec(campaign)
    return {
        "id": campaign.id,
        "state": campaign.state,
        "created_at_s": campaign.created_at_s,
        "approved_at_s": campaign.approved_at_s,
        **asdict(campaign.spec),
        "trigger": {f.name: getattr(trigger, f.name) for f in fields(trigger) if f.init},
    }


def from_wire(payload: object) -> Campaign:
    """Parse (and fully validate) a campaign received over the wire."""
    if not isinstance(payload, Mapping):
        raise ConfigError("a campaign must be a JSON object")
    data = dict(payload)
    data.pop("trigger", None)  # derived from the spec; rebuilt by to_trigger_spec, never trusted
    try:
        head = {k: data.pop(k) for k in ("id", "state", "created_at_s", "approved_at_s")}
    except KeyError as e:
        raise ConfigError(f"campaign is missing {e.args[0]!r}") from e
    created = _finite_at_least(head["created_at_s"], 0.0, "created_at_s")
    approved = head["approved_at_s"]
    approved = None if approved is None else _finite_at_least(approved, 0.0, "approved_at_s")
    return Campaign(head["id"], spec_from_json(data), head["state"], created, approved)


def to_trigger_spec(campaign: Campaign) -> TriggerSpec:
    """The recorder trigger that applies a campaign on the vehicle (named ``campaign.<name>``)."""
    from driveloop.edge.triggers import TriggerSpec

    s = campaign.spec
    return TriggerSpec(
        name=f"{TRIGGER_PREFIX}{s.name}",
        condition=s.condition,
        mode=s.trigger_mode,
        min_interval_s=s.min_interval_s,
        pre_s=s.pre_window_s,
        post_s=s.post_window_s,
        priority=s.priority,
        expires_at_s=s.expires_at_s,
    )


def trigger_specs(campaigns: Iterable[Campaign], now_s: float) -> list[TriggerSpec]:
    """Trigger specs for the campaigns active at ``now_s``, most urgent first."""
    return [to_trigger_spec(c) for c in active_campaigns(campaigns, now_s)]
