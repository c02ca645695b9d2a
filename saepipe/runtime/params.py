"""Reading ``params.yaml``: the one place stages get their settings from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"params file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of params (e.g. ``prepare``); a missing section is an error naming the file key."""
    if name not in params or not isinstance(params[name], dict):
        raise KeyError(f"params.yaml has no `{name}:` section")
    return dict(params[name])
