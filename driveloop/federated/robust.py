"""Robustness checks on one round's model updates, before any strategy aggregates them.

Pure numpy, no Flower: the server hands each reply's arrays here and aggregates only what comes back.
Rules, applied per reply in this order (the first that fails rejects the reply, with a named reason):

- ``unknown_vehicle``: the reply's vehicle id is not in the fleet the server was started for;
- ``duplicate_vehicle``: the same vehicle already replied this round (one vote per vehicle);
- ``wrong_keys`` / ``wrong_shape`` / ``wrong_dtype``: the arrays do not match the global model's tensors;
- ``non_finite``: any NaN or Inf;
- ``bad_num_examples``: the weight it asks for is not a positive integer;
- ``zero_update`` (only with ``reject_zero_updates``, which DP runs set): the update changes nothing.
  Harmless for plain averaging, but Flower's DP clipping divides by the update norm.

Accepted updates are then **norm-clipped**: the update Δ = reply − global is scaled down to at most
``max_update_norm`` (absolute cap) and ``clip_median_factor`` × the round's median update norm (so a
×50-scaled update weighs no more than an honest one, whatever the model's scale). Clipping keeps the
direction; a sign-flipped update has an honest norm and is left to the robust strategies (median,
trimmed mean, Krum) to outvote.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from driveloop.core.exceptions import ConfigError

logger = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]
REJECT_REASONS = ("unknown_vehicle", "duplicate_vehicle", "wrong_keys", "wrong_shape", "wrong_dtype", "non_finite",
                  "bad_num_examples", "zero_update")


@dataclass(frozen=True)
class RobustConfig:
    """``max_update_norm`` <= 0 and ``clip_median_factor`` <= 0 each switch that bound off."""

    max_update_norm: float = 0.0
    clip_median_factor: float = 3.0
    reject_zero_updates: bool = False

    def __post_init__(self) -> None:
        for name in ("max_update_norm", "clip_median_factor"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"robust {name} must be finite, got {getattr(self, name)}")

    @property
    def clipping(self) -> bool:
        return self.max_update_norm > 0 or self.clip_median_factor > 0


@dataclass(frozen=True)
class UpdateVerdict:
    """What happened to one vehicle's update (named parts, for the round log and the report)."""

    vehicle_id: str
    accepted: bool
    reason: str  # "ok", "clipped" or one of REJECT_REASONS
    detail: str = ""
    update_norm: float = float("nan")
    clip_scale: float = 1.0


@dataclass
class RoundScreen:
    """Verdicts of one round plus the (clipped) arrays of the accepted updates, in reply order."""

    verdicts: list[UpdateVerdict] = field(default_factory=list)
    accepted: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # reply index -> arrays
    clip_norm: float = float("inf")

    @property
    def rejected(self) -> list[UpdateVerdict]:
        return [v for v in self.verdicts if not v.accepted]

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.verdicts:
            out[v.reason] = out.get(v.reason, 0) + 1
        return out


def check_structure(arrays: Arrays, reference: Arrays) -> tuple[str, str] | None:
    """(reason, detail) when ``arrays`` cannot be a version of ``reference``; None when it fits."""
    if set(arrays) != set(reference):
        missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
        return "wrong_keys", f"missing {missing[:3]}, unexpected {extra[:3]}"
    for name, ref in reference.items():
        a = arrays[name]
        if tuple(a.shape) != tuple(ref.shape):
            return "wrong_shape", f"{name}: {tuple(a.shape)} != {tuple(ref.shape)}"
        if a.dtype != ref.dtype:
            return "wrong_dtype", f"{name}: {a.dtype} != {ref.dtype}"
    for name, a in arrays.items():
        if not np.all(np.isfinite(a)):
            return "non_finite", f"{name} holds NaN/Inf"
    return None


def update_norm(arrays: Arrays, reference: Arrays) -> float:
    """L2 norm of the whole update (all tensors flattened together), in float64."""
    return math.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - reference[k]) ** 2)) for k in reference))


def clip_bound(norms: Sequence[float], config: RobustConfig) -> float:
    """The round's clipping norm: the smaller of the absolute cap and factor × median norm (inf: none)."""
    bound = config.max_update_norm if config.max_update_norm > 0 else math.inf
    if config.clip_median_factor > 0 and len(norms):
        med = float(np.median(np.asarray(norms, dtype=np.float64)))
        if med > 0:
            bound = min(bound, config.clip_median_factor * med)
    return bound


def clip_update(arrays: Arrays, reference: Arrays, norm: float, bound: float) -> tuple[dict[str, np.ndarray], float]:
    """``reference + Δ·s`` with s = min(1, bound/‖Δ‖); returns (arrays, s). Dtypes are kept."""
    scale = 1.0 if norm <= bound or norm == 0 else bound / norm
    if scale == 1.0:
        return {k: np.asarray(arrays[k]) for k in reference}, 1.0
    out = {k: (reference[k].astype(np.float64) + (arrays[k].astype(np.float64) - reference[k]) * scale).astype(reference[k].dtype)
           for k in reference}
    return out, scale


def check_reply(vehicle_id: str, arrays: Arrays, num_examples: float, reference: Arrays,
                known_vehicles: Collection[str] | None, seen: Collection[str]) -> tuple[str, str] | None:
    """(reason, detail) when one reply must be rejected (see the module's rule order); None when usable.

    The server calls it as each reply arrives, so that only usable replies count toward the quorum.
    """
    if known_vehicles is not None and vehicle_id not in known_vehicles:
        return "unknown_vehicle", f"{vehicle_id!r} is not in this fleet"
    if vehicle_id in seen:
        return "duplicate_vehicle", f"{vehicle_id!r} already replied this round"
    problem = check_structure(arrays, reference)
    if problem is None and not (float(num_examples).is_integer() and num_examples >= 1):
        problem = ("bad_num_examples", f"num-examples {num_examples!r}")
    return problem


def screen_round(
    replies: Sequence[tuple[str, Arrays, float]],
    reference: Arrays,
    known_vehicles: Collection[str] | None,
    config: RobustConfig,
) -> RoundScreen:
    """Check and clip one round's replies ``(vehicle_id, arrays, num_examples)`` against the global model.

    ``known_vehicles`` None accepts any id. Every rejection is logged with its reason; nothing raises,
    so one bad vehicle never stops the round.
    """
    screen = RoundScreen()
    seen: set[str] = set()
    fits: list[tuple[int, str, Arrays, float]] = []
    pending: dict[int, UpdateVerdict] = {}
    for i, (vid, arrays, num_examples) in enumerate(replies):
        problem = check_reply(vid, arrays, num_examples, reference, known_vehicles, seen)
        seen.add(vid)
        if problem is not None:
            pending[i] = UpdateVerdict(vid, False, problem[0], problem[1])
            logger.warning("rejected update from %s: %s (%s)", vid, problem[0], problem[1])
            continue
        norm = update_norm(arrays, reference)
        if config.reject_zero_updates and norm == 0.0:
            pending[i] = UpdateVerdict(vid, False, "zero_update", "the update changes no weight", 0.0)
            logger.warning("rejected update from %s: zero_update", vid)
            continue
        fits.append((i, vid, arrays, norm))
    bound = clip_bound([n for *_, n in fits], config) if config.clipping else math.inf
    screen.clip_norm = bound
    for i, vid, arrays, norm in fits:
        clipped, scale = clip_update(arrays, reference, norm, bound)
        screen.accepted[i] = clipped
        reason = "clipped" if scale < 1.0 else "ok"
        if scale < 1.0:  # routine with gradient updates (heterogeneous vehicles): INFO; the round log counts them
            logger.info("clipped update from %s: norm %.4g > bound %.4g (scale %.3g)", vid, norm, bound, scale)
        pending[i] = UpdateVerdict(vid, True, reason, "", norm, scale)
    screen.verdicts = [pending[i] for i in range(len(replies))]
    return screen
