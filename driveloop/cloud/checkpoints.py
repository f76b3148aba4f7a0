"""Torch weights kept beside each registered ONNX model, keyed by the ONNX file's sha256.

The ONNX graph is what ships to vehicles; the torch state dict is what every fine-tune starts from
(never from scratch). Keying by the ONNX sha256 ties the two together without a second version scheme:
``load_weights(root, manifest)`` returns exactly the weights that produced that model file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import ModelError


def weights_path(registry_root: Path | str, onnx_sha256: str) -> Path:
    return Path(registry_root) / "weights" / f"{onnx_sha256}.pt"


def save_weights(registry_root: Path | str, onnx_sha256: str, state_dict: dict[str, Any]) -> Path:
    """Write the state dict atomically (``driveloop.core.atomic``)."""
    import torch

    path = weights_path(registry_root, onnx_sha256)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    write_atomic(path, buf.getvalue())
    return path


def load_weights(registry_root: Path | str, manifest: Any) -> dict[str, Any]:
    """The torch state dict that produced ``manifest``'s ONNX file; ModelError when it is missing."""
    import torch

    path = weights_path(registry_root, manifest.sha256)
    if not path.is_file():
        raise ModelError(f"no torch weights for model v{manifest.version} (expected {path}); cannot fine-tune it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged pickle/zip
        raise ModelError(f"torch weights of model v{manifest.version} are unreadable: {e}") from e


def load_policy(registry_root: Path | str, manifest: Any) -> Any:
    """A PolicyNet carrying ``manifest``'s weights, ready to fine-tune."""
    from driveloop.cloud.model import PolicyNet

    net = PolicyNet()
    net.load_state_dict(load_weights(registry_root, manifest))
    return net
