"""argparse ``type=`` checks: a bad value is a ``usage: ... error: argument X: ...`` line before any work starts.

Each factory returns a function that parses one command-line string or raises ``argparse.ArgumentTypeError``
with a message saying what is expected. Paths are only checked, never created, at parse time.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An integer in ``[minimum, maximum]``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < minimum or (maximum is not None and number > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return number

    parse.minimum, parse.maximum = minimum, maximum  # for --help and for tests probing the bounds
    return parse


def finite_float(minimum: float | None = None, *, exclusive: bool = False) -> Callable[[str], float]:
    """A finite float, optionally bounded below (``exclusive``: strictly above ``minimum``)."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
        if minimum is not None and (number < minimum or (exclusive and number == minimum)):
            raise argparse.ArgumentTypeError(f"must be {'>' if exclusive else '>='} {minimum:g}, got {value}")
        return number

    parse.minimum, parse.exclusive = minimum, exclusive
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
positive_float = finite_float(0.0, exclusive=True)
nonnegative_float = finite_float(0.0)
seed_int = int_at_least(0, 2**32 - 1)


def existing_file(value: str) -> str:
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder, expected a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {value}")
    return value


def existing_dir(value: str) -> str:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file, expected a folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"folder not found: {value}")
    return value


def _check_creatable(path: Path, value: str) -> None:
    """The first existing ancestor of ``path`` must be a folder this process may write into."""
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {value}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {value}: no permission to write in {parent}")


def output_file(value: str) -> str:
    """A file this process can write (it may exist; its folders may still have to be created)."""
    path = Path(value)
    if not value or path.is_dir() or value.endswith(os.sep):
        raise argparse.ArgumentTypeError(f"{value!r} is a folder, expected a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot write {value}: the file is read-only")
        _check_creatable(path, value)
        return value
    _check_creatable(path, value)
    return value


def output_dir(value: str) -> str:
    """A folder this process can create or write into."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file, expected a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot write into {value}: no permission")
        return value
    _check_creatable(path / "_", value)
    return value


def rendezvous_url(value: str) -> str:
    """``env://``, ``tcp://HOST:PORT`` or ``file:///PATH`` (the forms ``torch.distributed`` accepts)."""
    url = urlparse(value)
    if url.scheme == "env" and value.rstrip("/") == "env:":
        return value
    if url.scheme == "tcp":
        try:
            port = url.port
        except ValueError:
            port = None
        if url.hostname and port is not None and 0 < port < 65536:
            return value
        raise argparse.ArgumentTypeError(f"expected tcp://HOST:PORT with a port in 1-65535, got {value!r}")
    if url.scheme == "file" and url.path:
        return value
    raise argparse.ArgumentTypeError(f"expected env://, tcp://HOST:PORT or file:///PATH, got {value!r}")


def checked_by(check: Callable[[str], object]) -> Callable[[str], str]:
    """A type from a validator that raises ``ValueError`` with a user-facing message (e.g. a model registry's)."""

    def parse(value: str) -> str:
        try:
            check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


# What a path flag is to its script, for ``PathCheckingParser``: read (inputs) or written over (output files; an
# output folder may also be read from, e.g. archives laid out where they lie, and only gains files).
INPUT_TYPES: set[Callable] = {existing_file, existing_dir}
OUTPUT_TYPES: set[Callable] = {output_file}


class PathCheckingParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that refuses, as a usage error before any work, an output file (a flag of type
    ``output_file``) that is also one of the run's input paths (``existing_file``/``existing_dir``,
    or a type added to ``INPUT_TYPES``): ``--output_json CKPT -r CKPT`` would replace the checkpoint with JSON."""

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's own signature
        parsed, rest = super().parse_known_args(args, namespace)
        inputs, outputs = {}, {}
        for action in self._actions:
            values = getattr(parsed, action.dest, None)
            values = values if isinstance(values, list) else [values]
            for value in values:
                if not isinstance(value, str) or not value:
                    continue
                flag = "/".join(action.option_strings) or action.dest
                if action.type in OUTPUT_TYPES:
                    outputs.setdefault(os.path.realpath(value), (flag, value))
                elif action.type in INPUT_TYPES and os.path.exists(value):
                    inputs.setdefault(os.path.realpath(value), (flag, value))
        for path, (flag, value) in outputs.items():
            if path in inputs:
                self.error(f"{flag} {value} is also the input {inputs[path][0]} {inputs[path][1]}: an output never "
                           "replaces an input; give another path")
        return parsed, rest

