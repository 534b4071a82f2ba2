"""
Configuration as in nanoGPT, checked: a config file of bare assignments, then --key=value overrides.

    python train.py config/emo_tiny.py --lr=1e-3 --router=std

Every key must be a field of one of the dataclasses given (model.ModelConfig, train.TrainConfig, ...),
each defined once there with its default; an unknown key or a value of the wrong type is an error that
names it. A config file may start from another one: exec(open(os.path.join(os.path.dirname(__file__),
"emo_tiny.py")).read()) then override a few names.
"""

import ast
import dataclasses
import difflib
import os

from errors import UserError


class ConfigError(UserError):
    """A config file or --key=value that does not fit the config dataclasses."""


def read_config_file(path):
    """The public names a config file assigns: {key: value}."""
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    namespace = {"__file__": os.path.abspath(path)}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not callable(v)
            and type(v).__name__ != "module"}


def parse_value(text):
    """'3e-4' -> 0.0003, 'True' -> True, 'emo' -> 'emo' (a bare word stays a string)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_type(key, value, field_type, source):
    expected = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}[field_type]
    if expected is float and type(value) is int:
        return float(value)
    if expected is tuple and type(value) is list:
        return tuple(value)
    if type(value) is not expected:
        raise ConfigError(f"{key} must be {field_type}, got {value!r} ({type(value).__name__}) from {source}")
    return value


def parse_args(argv, *config_classes):
    """argv: [config.py] [--key=value ...] -> (one instance per class, the set of keys given explicitly)."""
    fields = {}
    for cls in config_classes:
        for field in dataclasses.fields(cls):
            fields[field.name] = (cls, field.type if isinstance(field.type, str) else field.type.__name__)
    given = []  # (key, value, source) in order, later ones win
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"expected --key=value, got {arg!r}")
            key, text = arg[2:].split("=", 1)
            given.append((key, parse_value(text), "the command line"))
        else:
            given += [(k, v, arg) for k, v in read_config_file(arg).items()]
    values = {cls: {} for cls in config_classes}
    for key, value, source in given:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r} from {source}{hint}")
        cls, field_type = fields[key]
        values[cls][key] = check_type(key, value, field_type, source)
    instances = tuple(cls(**values[cls]) for cls in config_classes)
    return instances, {key for key, _, _ in given}
