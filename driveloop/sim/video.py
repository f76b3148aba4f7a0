"""``driveloop drive --video``: frames of one vehicle with the model/fallback state overlaid.

GIF through imageio's pillow plugin, MP4 through imageio-ffmpeg (shipped inside its wheel). The file is
written to a temporary name and renamed on success, so a failed drive leaves no broken video behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from driveloop.core.exceptions import ConfigError

VIDEO_SUFFIXES = (".gif", ".mp4")
_BAR_PX = 22
_COLOURS = {"model": (30, 140, 60), "fallback": (200, 40, 30), "fcw": (230, 150, 0)}


def check_video_path(path: Path) -> Path:
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ConfigError(f"--video must end in {' or '.join(VIDEO_SUFFIXES)}, got {path.name!r}")
    if not path.parent.exists():
        raise ConfigError(f"--video directory does not exist: {path.parent}")
    return path


def overlay(frame: np.ndarray, source: str, fcw: bool, reason: str | None, t_s: float, speed_mps: float) -> np.ndarray:
    """Frame with a status bar on top: green while the model drives, amber on FCW, red on fallback."""
    from PIL import Image, ImageDraw

    state = "fallback" if source == "fallback" else "fcw" if fcw else "model"
    img = Image.fromarray(np.ascontiguousarray(frame[..., :3]))
    out = Image.new("RGB", (img.width, img.height + _BAR_PX), _COLOURS[state])
    out.paste(img, (0, _BAR_PX))
    label = {"model": "MODEL", "fcw": "MODEL + FCW", "fallback": f"FALLBACK: {reason or 'safety'}"}[state]
    ImageDraw.Draw(out).text((6, 5), f"t={t_s:5.1f}s  {speed_mps * 3.6:5.1f} km/h  {label}", fill=(255, 255, 255))
    return np.asarray(out)


class VideoWriter:
    """Collects overlaid frames; ``close()`` encodes them (atomically) at the control rate."""

    def __init__(self, path: Path, fps: float = 10.0, every: int = 1) -> None:
        self.path = check_video_path(path)
        self.fps, self.every = fps, max(1, every)
        self.frames: list[np.ndarray] = []
        self._n = 0

    def add(self, frame: np.ndarray, source: str, fcw: bool, reason: str | None, t_s: float, speed_mps: float) -> None:
        if self._n % self.every == 0:
            self.frames.append(overlay(frame, source, fcw, reason, t_s, speed_mps))
        self._n += 1

    def close(self) -> Path:
        import imageio.v2 as imageio

        if not self.frames:
            raise ConfigError("no frames were recorded for the video")
        tmp = self.path.with_name(f".{self.path.name}.part{self.path.suffix}")
        fps = self.fps / self.every
        try:
            if self.path.suffix.lower() == ".gif":
                imageio.mimsave(tmp, self.frames, format="GIF", duration=1000.0 / fps, loop=0)
            else:
                imageio.mimsave(tmp, self.frames, format="FFMPEG", fps=fps, macro_block_size=1)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return self.path
