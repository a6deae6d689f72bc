"""YAML configuration files: safe loading with clear errors, and the run's arguments dumped as ``config.yaml``."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from utils.errors import UserError
from utils.files import read_text, write_text


class ConfigError(UserError, ValueError):
    """A configuration file is missing, unparsable or not a mapping."""


def load_yaml(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.SafeLoader`` (no object construction from a file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        data = yaml.load(read_text(path, ConfigError, f"{what} file"), Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse {what} file {path}: {exc}") from exc
    if data is None:
        raise ConfigError(f"{what} file {path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must hold a mapping (key: value lines), got {type(data).__name__}")
    return data


def to_plain(value: Any) -> Any:
    """Plain Python types only (str/int/float/bool/None, lists, dicts), so YAML and ``weights_only`` loads accept it."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy scalars, 0-d tensors
        return value.item()
    return str(value)


def dump_args(args: argparse.Namespace | dict, path: str | os.PathLike) -> None:
    """Write the run's arguments as YAML (the paper's ``ckpt_dir/config.yaml``), readable by :func:`load_yaml`."""
    write_text(path, yaml.safe_dump(to_plain(args), sort_keys=True))
