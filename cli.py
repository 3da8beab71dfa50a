"""The command line: argparse built from a config dataclass (one field, one flag, one default,
one help text), sub-commands with a default one, one-line errors, and the checks of numbers
every script shares."""

import argparse
import dataclasses
import math
import sys

from common import UsageError, fail, read_run_json


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: argument --epochs: ...`) and exit status 2: the
    usage block is one `--help` away and would push the reason off a short terminal."""

    def error(self, message):
        fail(f"{message} (see --help)")


def command_parser(doc, commands):
    """A parser with one sub-parser per command ({name: help}, the first the default), each
    showing its flags' defaults; returns (parser, {name: sub-parser}). `parse_args` of a
    command line that starts with a flag runs the default command: `script.py --epochs 5`
    is `script.py train --epochs 5`."""
    parser = CommandParser(description=doc.split("\n\n")[0],
                           epilog=f"{next(iter(commands))} is the default command; "
                                  "COMMAND --help lists its flags")
    parser.default_command = next(iter(commands))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    return parser, {name: sub.add_parser(name, help=text, description=text,
                                         formatter_class=DefaultsHelpFormatter)
                    for name, text in commands.items()}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default once, after its help: none for a flag without a default (None) or
    whose help already says it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class CommandParser(ArgumentParser):
    """`ArgumentParser` whose command may be left out (then it is the default one)."""

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if not args or (args[0] not in self._subparsers._group_actions[0].choices
                        and args[0] not in ("-h", "--help")):
            args.insert(0, self.default_command)
        return super().parse_args(args, namespace)


def flag_name(key):
    """The command-line flag of a configuration key: img_size -> --img-size."""
    return "--" + key.replace("_", "-")


def option(default, help, **flag):
    """A configuration field that is also a command-line flag, `--field-name`, with its help
    text; `flag` goes to argparse (type, choices, metavar, aliases: old spellings)."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def add_config_flags(parser, config_class):
    """One flag per `option` field of the dataclass (the script's own fields first, those it
    inherits last), its default taken from the field, so that a name, a default and a help
    text are each written once. A bool field is `--x/--no-x`; a field whose default is None
    names its type."""
    fields = [f for f in dataclasses.fields(config_class) if "help" in f.metadata]

    def declared_by(field):  # 0: the class itself, 1: its base, ...
        return next(i for i, cls in enumerate(config_class.__mro__)
                    if field.name in cls.__dict__.get("__annotations__", {}))

    for field in sorted(fields, key=declared_by):
        flag = dict(field.metadata)
        names = [flag_name(field.name), *flag.pop("aliases", ())]
        if isinstance(field.default, bool) or flag.get("type") is bool:
            flag.pop("type", None)
            flag["action"] = argparse.BooleanOptionalAction
        elif field.default is not None:
            flag.setdefault("type", type(field.default))
        parser.add_argument(*names, dest=field.name, default=field.default, **flag)


def config_from_args(config_class, args):
    """The dataclass of the parsed flags (fields without a flag keep their defaults)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})


def config_from_json(config_class, saved):
    """The dataclass of a saved config.json (keys it no longer has are ignored)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in saved.items() if k in names})


def config_kinds(config_class):
    """{field: (its type, whether null is allowed)} of a config dataclass, for `read_run_json`:
    null where the field's default is None."""
    return {f.name: (f.type, f.default is None) for f in dataclasses.fields(config_class)}


def read_run_config(path, config_class):
    """The dataclass saved in a run's config.json, checked by `read_run_json` against the
    fields' types (the model's keys, `MODEL_KEYS`, must be there)."""
    required = [k for k in getattr(config_class, "MODEL_KEYS", ())
                if k not in getattr(config_class, "ADDED_KEYS", ())]
    return config_from_json(config_class, read_run_json(path, config_kinds(config_class),
                                                        required=required))


def check_at_least(config, minimum, *names):
    """`--epochs 0: must be at least 1` (`must be 0 or more` for 0), the one wording of a
    too-small number (None: unset)."""
    expected = "0 or more" if minimum == 0 else f"at least {minimum}"
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise UsageError(f"{flag_name(name)} {value}: must be {expected}")


def check_positive(config, *names):
    """`--lr 0.0: must be a positive number`."""
    for name in names:
        value = getattr(config, name)
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{flag_name(name)} {value}: must be a positive number")
