"""Config files and command-line overrides, validated once at the edge.

Each command declares its schema as a dataclass (its fields are the config keys, their defaults the
paper's values). `parse_config(Schema, argv)` reads `-c file.yaml`, applies `--key value` overrides on
top, and returns a typed instance. An unknown key or a value of the wrong type is a `ConfigError` whose
one-line message names the key, where it came from, and the valid choices.

    @dataclass
    class SampleConfig:
        model_name: str = field(default="Latte-XL/2", metadata={"choices": MODEL_NAMES, "help": "..."})
        num_frames: int = 16
"""
import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A user-caused configuration problem; its message is one line meant for the terminal."""


def first_line(err):
    """An exception as the one line that goes into a `latte <cmd>: error: ...` message (its type's name
    if it has no text)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _type_name(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(tp, value, what):
    """Convert `value` (a YAML value, or a string from the command line) to type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, what)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        items = [_coerce(item, v, what) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
    elif tp in (int, float):
        # an int key takes no float (1.5 is not silently cut); a float key takes an int
        numbers = int if tp is int else (int, float)
        if isinstance(value, numbers) and not isinstance(value, bool):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise AssertionError(f"config type {tp} is not supported")
    raise ConfigError(f"{what} must be {_type_name(tp)}, got {value!r}")


def _check_choices(f, value, what):
    choices = f.metadata.get("choices")
    if choices is None or value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if v not in choices:
            raise ConfigError(f"{what} is {v!r}; choose one of: {', '.join(map(str, choices))}")


def _unknown(key, names, where):
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}' {where}{hint}; valid keys: {', '.join(names)}")


def read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing YAML file with -c")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value pairs")
    return data


def build_config(schema, *sources):
    """An instance of `schema` from `(values, where)` pairs, later sources overriding earlier ones;
    every key and type is checked, and an error names the source it came from."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    kwargs = {}
    for values, where in sources:
        for key, raw in values.items():
            if key not in fields:
                raise _unknown(key, list(fields), where)
            what = f"'{key}' {where}"
            kwargs[key] = _coerce(hints[key], raw, what)
            _check_choices(fields[key], kwargs[key], what)
    cfg = schema(**kwargs)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def make_parser(schema, prog, description):
    """An argparse parser with `-c` and one `--key` per schema field; `--help` lists every key."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-c", "--config", help="YAML config file; --key value overrides any key in it")
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        text = f.metadata.get("help", "")
        if choices is not None:
            text += f" [{'|'.join(map(str, choices))}]"
        parser.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS,
                            metavar=_type_name(hints[f.name]).upper().replace(" ", "_"),
                            help=f"{text} (default: {default})")
    return parser


def parse_config(schema, argv, prog, description=""):
    """`-c file.yaml` plus `--key value` overrides -> a validated `schema` instance."""
    parser = make_parser(schema, prog, description)
    names = [f.name for f in dataclasses.fields(schema)]
    ns, unknown = parser.parse_known_args(argv)
    for token in unknown:
        if token.startswith("--"):
            raise _unknown(token[2:].split("=")[0], names, "on the command line")
        raise ConfigError(f"unexpected argument {token!r}; options are written --key value")
    values = read_yaml(ns.config) if ns.config else {}
    overrides = {k: v for k, v in vars(ns).items() if k in names}
    return build_config(schema, (values, f"in {ns.config}"), (overrides, "on the command line"))


def config_to_dict(cfg):
    return dataclasses.asdict(cfg)
