"""The command line the scripts share: config flags whose misspelled overrides are one line.

ml_collections defines a flag for each `--config.<path>=value` it finds in argv, looking the path
up in the loaded config; a path the config does not have ends in a traceback chained inside
ml_collections, raised while absl parses the flags, before a script's own error handler runs
(while the flag is defined, at import, when --config is not given; while flags are parsed when it
is). `define_config_file` and `run` catch it at both points and print one line instead.
"""

import difflib
import re
import sys
from collections.abc import Callable, Iterator, Sequence

from absl import app, flags
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import config_path
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

# The config flags defined through `define_config_file`: name -> default config path.
_CONFIG_FLAGS: dict[str, str | None] = {}


def define_config_file(name: str, default: str | None, help_string: str) -> flags.FlagHolder:
    """`config_flags.DEFINE_config_file`, with an override of an unknown key as one line.

    Args:
      name: the flag's name ("config").
      default: the config file used when the flag is not given, or None.
      help_string: the flag's help.

    Returns:
      The flag holder; its `.value` is the ConfigDict.
    """
    _CONFIG_FLAGS[name] = default
    try:
        return config_flags.DEFINE_config_file(name, default, help_string)
    except (KeyError, AttributeError):
        _exit_if_unknown_key(sys.argv)
        raise


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's `parse_flags_with_usage`, with an override of an unknown config key as one line."""
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError):
        _exit_if_unknown_key(argv)
        raise


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)`, its flags parsed by `parse_flags`."""
    app.run(main, flags_parser=parse_flags)


def unknown_key_message(name: str, config: config_dict.ConfigDict, argv: Sequence[str]) -> str:
    """One line for the first `--<name>.<path>` in `argv` that `config` has no field for, naming
    the three known dotted keys nearest to it; "" if every override names a field.

    Args:
      name: the config flag's name ("config").
      config: the loaded config.
      argv: the command line.
    """
    pattern = re.compile(rf"^--?(no)?{re.escape(name)}\.([^=]+)")
    for arg in argv:
        match = pattern.match(arg)
        if match is None:
            continue
        path = match.group(2)
        try:
            config_path.get_type(path, config)
        except (KeyError, AttributeError):
            nearest = difflib.get_close_matches(path, list(_dotted_keys(config)), n=3, cutoff=0)
            known = ", ".join(f"--{name}.{key}" for key in nearest)
            return f"--{name}.{path}: no such config key; nearest: {known}"
    return ""


def _exit_if_unknown_key(argv: Sequence[str]) -> None:
    """Prints the one line and exits 1 if an override names no field; returns otherwise (the
    caller re-raises the error it caught, a bug's traceback)."""
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)  # as ml_collections
    for name, default in _CONFIG_FLAGS.items():
        spec = _config_spec(name, argv, default)
        if spec is None:
            continue
        try:
            config = ConfigFileFlagParser(name=name, lock_config=False).parse(spec)
        except Exception:  # noqa: BLE001 - the config itself fails: let the original error show
            continue
        message = unknown_key_message(name, config, argv)
        if message:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)


def _config_spec(name: str, argv: Sequence[str], default: str | None) -> str | None:
    """The config file (with its `:variant`) that `--<name>` gives in argv, else the default."""
    for index, arg in enumerate(argv):
        match = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
        if match and match.group(1):
            return match.group(2)
        if match and index + 1 < len(argv):
            return argv[index + 1]
    return default


def _dotted_keys(config: config_dict.ConfigDict, prefix: str = "") -> Iterator[str]:
    for key, value in config.items():
        if isinstance(value, config_dict.ConfigDict):
            yield from _dotted_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"
