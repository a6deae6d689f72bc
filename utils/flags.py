"""Flags declared once, as dataclass fields: the command line, the checks and every record derived from them.

A flow's parameters are a dataclass whose fields are made by ``flag(...)``. Each declares, in one place:
- its flag names (the paper's long and short forms), type check, choices and help; the default is the field's;
- the roles it plays, which the rest of the code reads instead of keeping lists by hand:
  ``resume``: what a resumed training run does when the value differs from the checkpoint's run
  (``MUST_MATCH``: refused; ``MAY_CHANGE``: applied and logged; ``FREE``: no effect on the result);
  ``teacher_cache``: the value enters the key of the teachers' stored embeddings;
  ``store``: it enters the key of the stored descriptors of an evaluation (``True``: every part; a part kind such
  as ``"queries"``: those parts only);
  ``protocol``: it is recorded in the JSON results (``True``: under its own name; a string: under that name);
  ``config``: it is written to the run's ``config.yaml``;
  ``key``: how the value enters a key, when not as given: ``key(value, params)`` (a resolved path, a file's
  hash; None where the value does not matter given the other fields).

``add_flags`` builds the argparse groups from the fields, ``from_namespace`` makes the dataclass, ``check_values``
applies the same checks to values given from Python, ``role_values`` and ``record`` give the keys and records.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from utils.config import to_plain
from utils.errors import UsageError

MUST_MATCH = "must match"
MAY_CHANGE = "may change"
FREE = "free"
RESUME_POLICIES = (MUST_MATCH, MAY_CHANGE, FREE)

_FLAG = "flag"


@dataclasses.dataclass(frozen=True)
class Flag:
    """A field's command-line form and roles (see the module's docstring)."""

    names: tuple[str, ...]
    help: str
    group: str
    type: Callable[[str], Any] | None = None
    choices: Sequence[Any] | None = None
    nargs: str | int | None = None
    metavar: str | None = None
    switch: bool = False  # a store_true flag
    required: bool = False
    resume: str | None = None
    teacher_cache: bool = False
    store: bool | str = False
    protocol: bool | str = False
    config: bool = True
    key: Callable[[Any], Any] | None = None

    @property
    def shown(self) -> str:
        """The names as a message shows them: ``-ts/--teachers``."""
        return "/".join(self.names)


def flag(*names: str, help: str, group: str, default: Any = None, **spec: Any) -> Any:
    """A dataclass field declaring a flag (``default``: the field's and the parser's default)."""
    declared = Flag(names=names, help=help, group=group, **spec)
    if declared.resume is not None and declared.resume not in RESUME_POLICIES:
        raise ValueError(f"{names}: resume must be one of {RESUME_POLICIES}")
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={_FLAG: declared})
    return dataclasses.field(default=default, metadata={_FLAG: declared})


def redefault(cls: type, name: str, default: Any) -> Any:
    """The field ``name`` of ``cls`` with another default (a script whose paper default differs)."""
    spec = spec_of(cls, name)
    names = spec.names
    return flag(*names, default=default, **{f.name: getattr(spec, f.name) for f in dataclasses.fields(Flag)
                                            if f.name != "names"})


def declared_fields(cls_or_params: Any) -> list[tuple[dataclasses.Field, Flag]]:
    """Every flag field of a parameters dataclass (or instance), in declaration order."""
    return [(f, f.metadata[_FLAG]) for f in dataclasses.fields(cls_or_params) if _FLAG in f.metadata]


def spec_of(cls_or_params: Any, name: str) -> Flag:
    for field, spec in declared_fields(cls_or_params):
        if field.name == name:
            return spec
    raise KeyError(name)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


GROUP_ORDER = ("model", "data", "training", "PCA", "evaluation", "launch")  # as --help lists them


def add_flags(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """One argument per field, in the groups the fields name (``GROUP_ORDER`` first)."""
    fields = declared_fields(cls)
    named = {spec.group for _, spec in fields}
    groups = {name: parser.add_argument_group(name) for name in GROUP_ORDER if name in named}
    rank = {name: i for i, name in enumerate(groups)}
    for field, spec in sorted(fields, key=lambda item: rank.get(item[1].group, len(rank))):
        group = groups.get(spec.group) or groups.setdefault(spec.group, parser.add_argument_group(spec.group))
        kwargs: dict[str, Any] = {"dest": field.name, "default": _default(field), "help": spec.help}
        if spec.switch:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=spec.type, choices=list(spec.choices) if spec.choices is not None else None,
                          nargs=spec.nargs, metavar=spec.metavar, required=spec.required)
        group.add_argument(*spec.names, **{k: v for k, v in kwargs.items() if v is not None})
    return parser


def from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    return cls(**{field.name: getattr(namespace, field.name) for field, _ in declared_fields(cls)})


def check_values(params: Any) -> None:
    """The parser's checks applied to values given from Python (a number out of bounds, an unknown choice, a missing
    required value); ``UsageError`` names the flag. Values that came through the parser pass unchanged."""
    for field, spec in declared_fields(params):
        value = getattr(params, field.name)
        if value is None:
            if spec.required:
                raise UsageError(f"{spec.shown} is required")
            continue
        if spec.switch:
            if not isinstance(value, bool):
                raise UsageError(f"{spec.shown} is a switch: True or False, got {value!r}")
            continue
        values = value if spec.nargs in ("+", "*") else [value]
        if spec.nargs in ("+", "*") and (not isinstance(value, (list, tuple)) or (spec.nargs == "+" and not value)):
            raise UsageError(f"{spec.shown} takes a list of values, got {value!r}")
        for item in values:
            if spec.type is not None:
                try:
                    spec.type(str(item))
                except argparse.ArgumentTypeError as exc:
                    raise UsageError(f"{spec.shown}: {exc}") from None
            if spec.choices is not None and item not in spec.choices:
                raise UsageError(f"{spec.shown}: {item!r} is not one of {', '.join(map(str, spec.choices))}")


def role_values(params: Any, role: str, scope: str | None = None) -> dict[str, Any]:
    """``{name: value as keys see it}`` of the fields that play ``role`` (``teacher_cache``, ``store``) everywhere,
    or, with ``scope``, of those that play it only there (``store="queries"``)."""
    out = {}
    for field, spec in declared_fields(params):
        plays = getattr(spec, role)
        if (plays is True) if scope is None else (plays == scope):
            value = getattr(params, field.name)
            out[field.name] = to_plain(spec.key(value, params) if spec.key is not None and value is not None
                                       else value)
    return out


def protocol_values(params: Any) -> dict[str, Any]:
    """The fields recorded in the JSON results, under their recorded names."""
    return {(spec.protocol if isinstance(spec.protocol, str) else field.name): to_plain(getattr(params, field.name))
            for field, spec in declared_fields(params) if spec.protocol}


def resume_policy(cls: type, policy: str) -> frozenset[str]:
    return frozenset(field.name for field, spec in declared_fields(cls) if spec.resume == policy)


def record(params: Any) -> dict[str, Any]:
    """The fields written to ``config.yaml`` (plain values)."""
    return {field.name: to_plain(getattr(params, field.name)) for field, spec in declared_fields(params)
            if spec.config}
