"""Settings declared once: a dataclass field with `option(...)` is a flag, an environment variable and a
setting at the same time.

Each service has one settings dataclass (`router.config.RouterSettings`, `shard.settings.ShardSettings`).
From its fields come the CLI flags (`add_flags`, both spellings: TGI's `--max-concurrent-requests` and
the streaming guide's `--max_concurrent_requests`), their defaults from the environment, the settings
object itself (`from_args`), and the argv `sluice serve` hands to the shard process it starts
(`to_argv`). The README's flag table and the deployment files' environment names are checked against
these tables by tests/deploy.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

ROUTER, SHARD = "router", "shard"


@dataclass(frozen=True)
class Option:
    """How one setting is spelled outside Python. `commands`: the services whose command has the flag
    (`sluice serve` has the flags of both)."""

    flag: str
    env: str | None
    help: str
    type: Callable[[str], Any] | None
    choices: tuple | None
    action: str | None  # "store_true", "append", or "optional_bool" (--x / --no-x / unset: None); None: a value
    commands: frozenset[str]


def option(default: Any = None, *, flag: str | None = None, env: str | None = None, help: str = "",
           type: Callable[[str], Any] | None = None, choices: tuple | None = None, action: str | None = None,
           only: str | None = None, default_factory: Callable[[], Any] | None = None) -> Any:
    """A settings field that is also a flag (`flag`, else `--` + the field name with dashes) and, when
    `env` is given, read from that environment variable when the flag is absent. `only`: the flag
    exists on that service's command alone (not on `sluice serve`)."""
    meta = {"option": Option(flag or "", env, help, type, choices, action, frozenset([only]) if only else frozenset())}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def options(settings_cls: type) -> Iterator[tuple[dataclasses.Field, Option]]:
    """(field, option) for every field of a settings class that is a flag, with the flag name filled in."""
    for f in dataclasses.fields(settings_cls):
        opt = f.metadata.get("option")
        if opt is not None:
            yield f, dataclasses.replace(opt, flag=opt.flag or "--" + f.name.replace("_", "-"))


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _from_env(f: dataclasses.Field, opt: Option) -> Any:
    """The environment's value, typed; an empty variable counts as unset (compose writes `X: ${X:-}`)."""
    raw = os.environ.get(opt.env) if opt.env else None
    if raw in (None, ""):
        return _default(f)
    if opt.action in ("store_true", "optional_bool"):
        return raw not in ("0", "false", "no")
    if opt.action == "append":
        return [a for a in raw.split(",") if a]
    return opt.type(raw) if opt.type else raw


def dest(opt: Option) -> str:
    """The parsed-arguments attribute of a flag: named after the flag, as argparse would."""
    return opt.flag[2:].replace("-", "_")


def spellings(flag: str) -> list[str]:
    """`--max-input-tokens` and `--max_input_tokens`: TGI's spelling and the streaming guide's."""
    names = [flag]
    if "-" in flag[2:]:
        names.append("--" + flag[2:].replace("-", "_"))
    return names


def add_flags(parser: argparse.ArgumentParser, settings_cls: type, command: str) -> None:
    """Add the flags of `settings_cls` that `command` has. A flag another table already added (both
    services read `--model-id`) must be declared the same way in both."""
    known = {a.dest: a for a in parser._actions}
    for f, opt in options(settings_cls):
        if opt.commands and command not in opt.commands:
            continue
        if dest(opt) in known:
            if known[dest(opt)].default != _from_env(f, opt):
                raise ValueError(f"{opt.flag}: declared with different defaults by two settings tables")
            continue
        kw: dict[str, Any] = {"dest": dest(opt), "default": _from_env(f, opt), "help": _help(f, opt)}
        if opt.action == "optional_bool":  # --x sets True, --no-x False, neither leaves the default
            parser.add_argument(*spellings("--no-" + opt.flag[2:]), dest=dest(opt), action="store_const",
                                const=False, default=kw["default"], help=f"the opposite of {opt.flag}")
            kw.update(action="store_const", const=True)
        elif opt.action:
            kw["action"] = opt.action
        if opt.type and opt.action is None:
            kw["type"] = opt.type
        if opt.choices:
            kw["choices"] = opt.choices
        if opt.action == "append":
            # argparse appends to a given default list; start empty and fill the default in from_args.
            kw["default"] = None
        parser.add_argument(*spellings(opt.flag), **kw)


def _help(f: dataclasses.Field, opt: Option) -> str:
    default = _default(f)
    parts = [opt.help] if opt.help else []
    if default not in (None, False, [], ""):
        parts.append(f"default {default}")
    if opt.env:
        parts.append(f"env {opt.env}")
    return "; ".join(parts)


def from_args(settings_cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The settings object from parsed flags (absent ones: the environment, then the field default)."""
    values: dict[str, Any] = {}
    for f, opt in options(settings_cls):
        if hasattr(args, dest(opt)):
            value = getattr(args, dest(opt))
            if opt.action == "append" and not value:
                value = _from_env(f, opt)
            values[f.name] = value
    return settings_cls(**{**values, **overrides})


def to_argv(settings: Any, command: str) -> list[str]:
    """The flags that give `command` these settings: every flag it has, its value spelled out (so the
    child process does not depend on what it finds in its environment)."""
    argv: list[str] = []
    for f, opt in options(type(settings)):
        if opt.commands and command not in opt.commands:
            continue
        value = getattr(settings, f.name)
        if value is None or (opt.action == "store_true" and not value):
            continue
        if opt.action in ("store_true", "optional_bool"):
            argv.append(opt.flag if value else "--no-" + opt.flag[2:])
        elif opt.action == "append":
            for item in value:
                argv += [opt.flag, str(item)]
        else:
            argv += [opt.flag, str(value)]
    return argv


def env_names(*settings_classes: type) -> set[str]:
    """Every environment variable these tables read."""
    return {opt.env for cls in settings_classes for _, opt in options(cls) if opt.env}
