"""Options as data: one declaration per option gives its command-line flag, its YAML key and its
one-line check.

Every command's settings are a dataclass whose fields are declared with `option(...)`: `Config`
(run, hessian, solve, prune, compare, study), `HealConfig` (heal), and the option classes of eval,
repair, bench and export. `add_arguments` is the only code that turns them into flags, `build`
the only code that merges a `--config FILE.yaml` with the command line and checks the result. An
option that two commands share is declared once and copied with `shared(...)`, so it has one
default and one help text everywhere.

Torch-free (foundation layer): `cboprune --help` builds every parser from these declarations.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any, Callable

from cboprune.core.errors import CBOPruneError

#: how a kind reads from the command line (the others: str; flag/bool/Ms/steps/strs are special)
KINDS = ("int", "float", "str", "bool", "flag", "ints", "kinds", "Ms", "steps", "strs", "energy")


def option(default: Any = MISSING, help: str = "", section: str = "options", *, kind: str = "str",
           minimum: float | None = None, metavar: str | None = None, factory: Callable[[], Any] | None = None,
           flag: str | None = None, aliases: tuple[str, ...] = (), choices: tuple[str, ...] | None = None,
           positional: bool = False, nargs: str | None = None, hidden: bool = False,
           computed: bool = False, names: Callable[[], list[str]] | None = None) -> Any:
    """A dataclass field that is also an option. `kind` picks the flag's parser and the check
    (see KINDS); `flag` replaces the flag made from the name (--max-steps for max_steps), `aliases`
    adds short spellings (--steps); `hidden` keeps a library-only field off the command line; `computed`
    marks a field without a default that the command fills in when it is not given (`build(computed=)`);
    `names` lists the accepted names in the help (registered methods, read when the help is built)."""
    assert kind in KINDS, kind
    meta = {"help": help, "section": section, "kind": kind, "minimum": minimum, "metavar": metavar, "flag": flag,
            "aliases": tuple(aliases), "choices": None if choices is None else tuple(choices),
            "positional": positional, "nargs": nargs, "hidden": hidden, "computed": computed,
            "names": names}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def field_of(cls, name: str) -> Field:
    return next(f for f in fields(cls) if f.name == name)


def shared(cls, name: str, *, default: Any = MISSING, **changes: Any) -> Any:
    """The option `name` of `cls` again, for another command that takes the same setting: its help,
    kind and default (unless `default` says otherwise), with `changes` to its metadata (a section,
    a flag spelling)."""
    f = field_of(cls, name)
    meta = {**f.metadata, **changes}
    value = default if default is not MISSING else f.default
    if value is MISSING and f.default_factory is not MISSING:
        return field(default_factory=f.default_factory, metadata=meta)
    return field(default=value, metadata=meta)


def default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def flag_of(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def is_option(f: Field) -> bool:
    return "kind" in f.metadata and not f.metadata.get("hidden")


def int_list(text: str) -> list[int]:
    """The one parser of comma-separated integers (`--blocks 3,7,12`, `--heal-seeds 0,1`)."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,-1, got {text!r}") from None


def kind_list(text: str) -> list[str]:
    kinds = [t for t in text.replace(" ", "").split(",") if t]
    if not kinds:
        raise argparse.ArgumentTypeError(f"expected comma-separated block kinds like moe or mamba,moe, got {text!r}")
    return kinds


def add_arguments(parser: argparse.ArgumentParser, cls, names: list[str] | tuple[str, ...] | None = None) -> None:
    """The flags of `cls`'s options (or of `names` among them), grouped by section. Flags default to
    None, so that `build` can tell a flag given from one left to the YAML file or the default."""
    groups: dict[str, Any] = {g.title: g for g in parser._action_groups}  # a section added twice is one group
    for f in fields(cls):
        if not is_option(f) or (names is not None and f.name not in names):
            continue
        meta = f.metadata
        kind, help_ = meta["kind"], meta["help"]
        if meta["positional"]:
            default = default_of(f)
            parser.add_argument(f.name, nargs=meta["nargs"], metavar=meta["metavar"], help=help_,
                                **({} if default is MISSING else {"default": default}))
            continue
        section = meta["section"]
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
        if default_of(f) is MISSING and not meta["computed"]:  # not argparse's required: the value may come from the YAML file
            help_ = f"{help_} (required)"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_}
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if meta["choices"] is not None:
            kw["choices"] = meta["choices"]
        spellings = [flag_of(f), *meta["aliases"]]
        if kind == "flag":
            group.add_argument(*spellings, action="store_true", **kw)
        elif kind == "bool":
            group.add_argument(*spellings, action=argparse.BooleanOptionalAction, **kw)
        elif kind in ("Ms", "steps"):
            kw.setdefault("metavar", "M" if kind == "Ms" else "STEPS")
            group.add_argument(*spellings, type=int, nargs="+", **kw)
        elif kind == "strs":
            group.add_argument(*spellings, nargs="+", **kw)
        elif kind == "energy":  # names checked by validate (one line, a suggestion), listed in the help
            kw["help"] = f"{help_}: {', '.join(meta['names']())}" if meta.get("names") else help_
            group.add_argument(*spellings, **kw)
        else:
            kw["type"] = {"int": int, "float": float, "ints": int_list, "kinds": kind_list}.get(kind, str)
            group.add_argument(*spellings, **kw)


def check(f: Field, value: Any) -> str | None:
    """The one-line problem of `value` for option `f`, or None."""
    meta = f.metadata
    kind, minimum, choices = meta.get("kind"), meta.get("minimum"), meta.get("choices")
    name = flag_of(f)  # the flag; the YAML key is the field name
    if value is None:
        return None if default_of(f) is None else f"{name} must be set"
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{name} must be an integer, got {value!r}"
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{name} must be a number, got {value!r}"
    if kind in ("bool", "flag") and not isinstance(value, bool):
        return f"{name} must be true or false, got {value!r}"
    if kind == "steps" and (not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        return f"{name} must be positive numbers of optimizer steps, got {value!r}"
    if kind in ("ints", "Ms") and (not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return f"{name} must be a list of integers, got {value!r}"
    if kind == "Ms":
        if not value:
            return f"{name} must list at least one number of blocks M"
        if any(m <= 0 for m in value):
            return f"{name} needs numbers of blocks M >= 1, got {value}"
    if kind == "kinds" and not (isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(k, str) and k for k in value))):
        return f"{name} must be a list of block kinds such as [moe], got {value!r}"
    if kind == "strs" and (not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v.strip() for v in value)):
        return f"{name} must be a list of one or more data specs, got {value!r}"
    if kind == "str" and not isinstance(value, str):
        return f"{name} must be a string, got {value!r}"
    if choices is not None and value not in choices:
        return f"{name} must be one of {', '.join(choices)}, got {value!r}"
    if minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum:
        word = "a positive integer" if minimum == 1 else f"at least {minimum}"
        return f"{name} must be {word}, got {value!r}"
    return None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A `--config` file: a mapping of option names (dashes read as underscores)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CBOPruneError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CBOPruneError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CBOPruneError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def unknown_keys_error(unknown: list[str], allowed: list[str], command: str) -> CBOPruneError:
    hints = [f"{k!r} -> {c[0]!r}" for k in unknown if (c := difflib.get_close_matches(k, allowed, n=1))]
    return CBOPruneError(f"unknown config keys {unknown} for `{command}`"
                         + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                         + f": valid keys are {', '.join(allowed)}")


#: namespace entries that are the parser's own, not a command's settings
_PARSER_DESTS = {"command", "func", "quiet", "config", "help"}


def build(cls, args: argparse.Namespace, command: str, *,
          computed: dict[str, Callable[[], Any]] | None = None):
    """`cls` from its option defaults, the `--config` YAML (`args.config`) and the command line, which
    wins. `computed` supplies a default that needs work (the teacher named in removal.json) when neither
    gives the option. Unknown keys, wrong kinds and missing required options: one line, before any work.
    The YAML may also hold the command's other flags (--trust-remote-code, ...), which the CLI reads."""
    names = [f.name for f in fields(cls) if is_option(f)]
    values = read_yaml(args.config) if getattr(args, "config", None) else {}
    allowed = sorted(set(names) | (set(vars(args)) - _PARSER_DESTS))
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise unknown_keys_error(unknown, allowed, command)
    values = {k: v for k, v in values.items() if k in names}
    values.update({n: getattr(args, n) for n in names if getattr(args, n, None) is not None})
    for name, make in (computed or {}).items():
        if values.get(name) is None:
            values[name] = make()
    problems = []
    for f in fields(cls):
        if f.name not in names:
            continue
        if f.name not in values:
            if default_of(f) is MISSING:
                problems.append(f"{flag_of(f)} is required (or a `{f.name}:` key in --config)")
            continue
        if f.metadata["kind"] == "ints" and isinstance(values[f.name], str):  # YAML `batch_sizes: 1,8`
            try:
                values[f.name] = int_list(values[f.name])
            except argparse.ArgumentTypeError as exc:
                problems.append(f"{flag_of(f)}: {exc}")
                continue
        problem = check(f, values[f.name])
        if problem:
            problems.append(problem)
    if problems:
        raise CBOPruneError(f"`{command}`: " + "; ".join(problems))
    return cls(**values)
