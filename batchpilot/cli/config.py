"""Namespaced flags and config files for a command whose configuration is a tree of dataclasses.

``add_field_flags`` turns every field of every component into ``--component.field`` (the convention of
torchtitan and litgpt: ``--optim.lr``, ``--batch.policy``), typed from the dataclass annotations; a flag that is
not given is absent from the parsed namespace, so only what the user wrote overrides the config file.
``load_config_file`` reads ``--config`` (TOML through the standard library, JSON always, YAML when PyYAML is
importable) into the same nested form, and ``merged_tree`` lays the flags over it. Flat flags of an older
release stay as hidden aliases that print a one-line deprecation note naming the new flag.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PREFIX = "field:"  # argparse dest of --component.field flags
LEGACY_PREFIX = "legacy:"
ALIAS_PREFIX = "alias:"  # short names of a few fields (--offload), not deprecated


def parse_int(text: str) -> int:
    """Integers with optional scientific notation or underscores: 1e6, 2_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value != value or value in (float("inf"), float("-inf")) or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    return int(value)


def base_type(hint: object) -> tuple[type, bool]:
    """(the type, whether None is allowed) of ``int | None`` style annotations."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False  # type: ignore[return-value]


def converter(kind: type, optional: bool) -> typing.Callable[[str], object]:
    parse: typing.Callable[[str], object] = parse_int if kind is int else kind

    def convert(text: str) -> object:
        if optional and text.lower() in ("none", "null"):
            return None
        return parse(text)

    convert.__name__ = kind.__name__  # argparse names the type in its error messages
    return convert


def add_field_flags(parser: argparse.ArgumentParser, fields: Mapping[str, object],
                    defaults: Mapping[str, object], help_texts: Mapping[str, str]) -> None:
    """One ``--component.field`` flag per dotted name in ``fields`` (name -> annotation)."""
    for dotted, hint in fields.items():
        kind, optional = base_type(hint)
        default = defaults.get(dotted)
        shown = f" (default: {default})" if default not in (None, "") else ""
        help_text = (help_texts.get(dotted, "") + shown).replace("%", "%%")
        if kind is bool:
            parser.add_argument(f"--{dotted}", dest=PREFIX + dotted, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            suffix = " (none: unset)" if optional else ""
            parser.add_argument(f"--{dotted}", dest=PREFIX + dotted, type=converter(kind, optional),
                               default=argparse.SUPPRESS, metavar=kind.__name__.upper(), help=help_text + suffix)


def add_legacy_flags(parser: argparse.ArgumentParser, legacy: Mapping[str, tuple[str, ...]],
                     fields: Mapping[str, object]) -> None:
    """Hidden ``--old-name`` aliases; ``legacy`` maps the old flat name to the dotted field(s) it sets."""
    for name, targets in legacy.items():
        kind, optional = base_type(fields[targets[0]])
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=LEGACY_PREFIX + name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=LEGACY_PREFIX + name, type=converter(kind, optional),
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_alias_flags(parser: argparse.ArgumentParser, aliases: Mapping[str, str],
                    fields: Mapping[str, object]) -> None:
    """Short ``--name`` flags for a few dotted fields (``aliases``: name -> dotted), listed in --help; the
    dotted flag wins when both are given."""
    for name, dotted in aliases.items():
        kind, optional = base_type(fields[dotted])
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=ALIAS_PREFIX + dotted, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"short for --{dotted}")
        else:
            parser.add_argument(flag, dest=ALIAS_PREFIX + dotted, type=converter(kind, optional),
                                default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                                help=f"short for --{dotted}")


def given_fields(args: argparse.Namespace, legacy: Mapping[str, tuple[str, ...]], *, command: str) -> dict[str, object]:
    """The dotted fields the command line set; each legacy flag used prints one deprecation line to stderr."""
    out: dict[str, object] = {}
    for dest, value in vars(args).items():
        if dest.startswith(LEGACY_PREFIX):
            name = dest[len(LEGACY_PREFIX):]
            new = " and ".join("--" + t for t in legacy[name])
            print(f"batchpilot {command}: note: --{name.replace('_', '-')} is deprecated and will be removed; "
                  f"use {new}", file=sys.stderr)
            for target in legacy[name]:
                out[target] = value
    for dest, value in vars(args).items():  # short aliases: under the dotted flag, over the legacy ones
        if dest.startswith(ALIAS_PREFIX):
            out[dest[len(ALIAS_PREFIX):]] = value
    for dest, value in vars(args).items():  # a new-style flag wins over its old alias
        if dest.startswith(PREFIX):
            out[dest[len(PREFIX):]] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A nested mapping from a .toml, .json, .yaml/.yml file (YAML needs PyYAML); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            import tomllib

            data: object = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"config file {path}: YAML needs PyYAML (pip install pyyaml); or use TOML or JSON") \
                    from None
            data = yaml.safe_load(text)
        else:
            raise ValueError(f"config file {path}: use .toml, .json or .yaml")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 -- tomllib, json and yaml each raise their own parse errors
        raise ValueError(f"config file {path} does not parse: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: the top level must be a table of components")
    return data


def merged_tree(base: Mapping[str, Any], overrides: Mapping[str, object]) -> dict[str, Any]:
    """``base`` (from a file) with the dotted ``overrides`` laid over it."""
    tree: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for dotted, value in overrides.items():
        component, _, name = dotted.partition(".")
        part = tree.setdefault(component, {})
        if not isinstance(part, dict):
            raise ValueError(f"{component} must be a table of fields")
        part[name] = value
    return tree
