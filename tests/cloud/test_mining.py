"""Mining: the score table, rarity, and selection (windows, top-k, seeded replay)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from driveloop.cloud.mining import (
    MiningConfig,
    bin_counts,
    finish_scores,
    score_frames,
    select_frames,
)
from driveloop.core.exceptions import ConfigError, PipelineError
from tests.fakes.frames import braking_lead, make_frames


def _one_frame(**changes: object):
    base = make_frames(np.full(1, 25.0), gap0_m=200.0)
    return dataclasses.replace(base, **changes)


B = np.array([True])
F = np.array([False])

SCORE_TABLE = [
    # name, frame changes, the part expected high, value
    ("nominal", {}, None, 0.0),
    ("aeb", {"aeb": B}, "event", 1.0),
    ("fallback", {"fallback": B}, "event", 1.0),
    ("fcw", {"fcw": B}, "event", 1.0),
    ("watchdog", {"watchdog": B}, "event", 1.0),
    ("collision", {"collision": B}, "event", 1.0),
    ("ttc at half the threshold", {"ttc_s": np.array([1.5])}, "ttc", 0.5),
    ("ttc above the threshold", {"ttc_s": np.array([3.5])}, None, 0.0),
    ("confidence 0.25", {"confidence": np.array([0.25])}, "confidence", 0.5),
    ("confidence 0", {"confidence": np.array([0.0])}, "confidence", 1.0),
    ("accel disagreement 1 m/s2", {"applied_action": np.array([[-1.0, 0.0]])}, "disagreement", 0.5),
    ("steer disagreement saturates", {"applied_action": np.array([[0.0, 0.5]])}, "disagreement", 1.0),
]


@pytest.mark.parametrize(("name", "changes", "part", "value"), SCORE_TABLE, ids=[r[0] for r in SCORE_TABLE])
def test_score_table(name: str, changes: dict, part: str | None, value: float) -> None:
    frames = _one_frame(**changes)
    frames = dataclasses.replace(frames, model_action=np.zeros((1, 2)))
    if "applied_action" not in changes:
        frames = dataclasses.replace(frames, applied_action=np.zeros((1, 2)))
    s = score_frames(frames, MiningConfig())
    for p, arr in s.parts.items():
        expected = value if p == part else 0.0
        assert arr[0] == pytest.approx(expected), (name, p)


def test_rarity_ranks_the_rare_bin_higher_and_total_is_weighted() -> None:
    common = make_frames(np.full(50, 25.0), gap0_m=200.0, segment_id="common", scenario="highway")
    rare = make_frames(np.full(2, 25.0), gap0_m=200.0, segment_id="rare", scenario="merge")
    cfg = MiningConfig()
    raw = [score_frames(common, cfg), score_frames(rare, cfg)]
    counts = bin_counts(raw)
    done = [finish_scores(s, counts, cfg) for s in raw]
    assert done[1].parts["rarity"][0] > done[0].parts["rarity"][0]
    w = np.asarray(cfg.weights)
    manual = sum(w[i] * done[1].parts[p][0] for i, p in enumerate(("event", "ttc", "confidence", "disagreement", "rarity"))) / w.sum()
    assert done[1].total[0] == pytest.approx(manual)


def test_selection_keeps_events_with_window_topk_and_seeded_replay() -> None:
    cfg = MiningConfig(window_s=1.0, replay_ratio=0.5)
    segs = [make_frames(braking_lead(), segment_id="brake"), make_frames(np.full(150, 25.0), gap0_m=200.0, segment_id="calm")]
    raw = [score_frames(f, cfg) for f in segs]
    counts = bin_counts(raw)
    scores = [finish_scores(s, counts, cfg) for s in raw]
    sel = select_frames(scores, cfg, seed=7)
    hard = set(sel.hard["brake"].tolist())
    events = np.flatnonzero(segs[0].event)
    assert set(events.tolist()) <= hard
    assert events.min() - 10 in hard  # 1 s window before the first event
    assert "calm" not in sel.hard
    assert sel.n_replay == round(0.5 * sel.n_hard)
    for seg, idx in sel.replay.items():
        assert not (set(idx.tolist()) & set(sel.hard.get(seg, np.zeros(0)).tolist()))
    again = select_frames(scores, cfg, seed=7)
    assert all(np.array_equal(again.replay[k], v) for k, v in sel.replay.items())
    capped = select_frames(scores, dataclasses.replace(cfg, top_k=5), seed=7)
    assert capped.n_hard == 5
    best = sorted(scores[0].total, reverse=True)[:5]
    assert sorted(scores[0].total[capped.hard["brake"]], reverse=True) == pytest.approx(best)


def test_replay_keeps_a_braking_class_beside_its_own_nominal_frames() -> None:
    """A class whose hard frames are all braking (fog) gets ``replay_class_share`` of the replay from its own
    nominal frames, in proportion to its hard frames; the rest stays uniform over every nominal frame."""
    from driveloop.cloud.mining import scenario_class_of

    segs = [make_frames(braking_lead(), segment_id="fog", scenario="fog-25")]
    segs += [make_frames(np.full(150, 25.0), gap0_m=200.0, segment_id=f"calm{i}", scenario="highway") for i in range(4)]

    def replay_in_fog(share: float) -> tuple[int, int, int]:
        cfg = MiningConfig(window_s=1.0, replay_ratio=0.5, replay_class_share=share)
        raw = [score_frames(f, cfg) for f in segs]
        scores = [finish_scores(x, bin_counts(raw), cfg) for x in raw]
        assert [scenario_class_of(x) for x in scores] == ["fog"] + ["highway"] * 4
        sel = select_frames(scores, cfg, seed=5)
        assert set(sel.hard) == {"fog"} and sel.n_replay == round(0.5 * sel.n_hard)
        pool = len(segs[0]) - sel.n_hard  # fog's nominal frames
        return len(sel.replay.get("fog", [])), sel.n_replay, pool

    all_own, n_replay, pool = replay_in_fog(1.0)
    assert all_own == min(pool, n_replay)  # every hard frame is fog's: the whole replay is fog's when it can be
    half, _, _ = replay_in_fog(0.5)
    uniform, _, _ = replay_in_fog(0.0)
    assert uniform < half <= all_own and half >= round(0.5 * n_replay)
    with pytest.raises(ConfigError, match="replay_class_share"):
        MiningConfig(replay_class_share=1.5)


def test_segments_rank_by_mean_score() -> None:
    from driveloop.cloud.mining import rank_segments

    cfg = MiningConfig()
    segs = [make_frames(np.full(150, 25.0), gap0_m=200.0, segment_id="calm"), make_frames(braking_lead(), segment_id="brake")]
    raw = [score_frames(f, cfg) for f in segs]
    counts = bin_counts(raw)
    ranked = rank_segments([finish_scores(s, counts, cfg) for s in raw])
    assert [r[0] for r in ranked] == ["brake", "calm"] and ranked[0][1] > ranked[1][1]
    assert rank_segments([finish_scores(s, counts, cfg) for s in raw], top=1) == ranked[:1]


def test_selection_refuses_unfinished_scores() -> None:
    cfg = MiningConfig()
    with pytest.raises(PipelineError, match="finish_scores"):
        select_frames([score_frames(make_frames(np.full(5, 25.0)), cfg)], cfg, seed=0)


def test_frames_reject_ragged_arrays() -> None:
    f = make_frames(np.full(5, 25.0))
    with pytest.raises(PipelineError, match="confidence"):
        dataclasses.replace(f, confidence=np.ones(4))


@pytest.mark.parametrize(
    "changes",
    [{"ttc_threshold_s": 0.0}, {"confidence_threshold": 1.5}, {"weights": (1.0, 1.0)}, {"top_k": 0}, {"replay_ratio": -1.0}],
)
def test_config_validation(changes: dict) -> None:
    with pytest.raises(ConfigError):
        MiningConfig(**changes)


@pytest.mark.parametrize(
    ("mask", "k", "want"),
    [
        ([0, 0, 1, 0, 0, 0], 1, [0, 1, 1, 1, 0, 0]),
        ([1, 0, 0, 0], 10, [1, 1, 1, 1]),  # window longer than the segment
        ([0, 0, 0], 5, [0, 0, 0]),
        ([0, 1, 0], 0, [0, 1, 0]),
        ([], 3, []),
    ],
)
def test_widen_mask(mask: list[int], k: int, want: list[int]) -> None:
    from driveloop.cloud.mining import widen_mask

    assert widen_mask(np.array(mask, dtype=bool), k).tolist() == [bool(w) for w in want]


def test_selection_follows_segment_order_not_segment_ids() -> None:
    """Segment ids are content hashes, which differ run to run (wall-clock fields in the bytes): the
    same recordings in the same order must give the same frames whatever their ids sort as."""
    cfg = MiningConfig(window_s=1.0, replay_ratio=2.0)
    frames = [make_frames(braking_lead(), segment_id="a"), make_frames(braking_lead(), segment_id="b"),
              make_frames(np.full(150, 25.0), gap0_m=200.0, segment_id="c")]

    def select(ids: list[str]) -> list[tuple[list[int], list[int]]]:
        renamed = [dataclasses.replace(f, segment_id=i) for f, i in zip(frames, ids)]
        raw = [score_frames(f, cfg) for f in renamed]
        scores = [finish_scores(s, bin_counts(raw), cfg) for s in raw]
        sel = select_frames(scores, dataclasses.replace(cfg, top_k=40), seed=3)
        empty = np.zeros(0, dtype=np.int64)
        return [(sel.hard.get(i, empty).tolist(), sel.replay.get(i, empty).tolist()) for i in ids]

    assert select(["x1", "x2", "x3"]) == select(["z9", "m5", "a0"])  # ids that sort the other way round
    assert select(["x1", "x2", "x3"])[0][0] != []  # the tie between the two braking segments is broken by order
