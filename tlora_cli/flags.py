"""Command-line flags generated from the options classes (options.py), so that each is declared once.

`with_options()` gives a Typer command, in place of each parameter typed with an options class, every flag of that
class, and calls it with an instance built by keyword. A keyword picks part of a class (`Pick`), or stands a list of
classes for a dict of instances by class (the method options of `tlora init`).
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Annotated, Any

import typer

from .options import Options, flag_fields, flag_of


@dataclass(frozen=True)
class Pick:
    """Part of an options class's flags (`only`), some with the command's own help (`helps`)."""

    cls: type
    only: tuple[str, ...] | None = None
    helps: dict[str, str] = field(default_factory=dict)


Group = type | Pick | Sequence[type]


def _is_group(param: inspect.Parameter, overrides: dict) -> bool:
    return param.name in overrides or (isinstance(param.annotation, type) and issubclass(param.annotation, Options))


def _picks(group: Group) -> list[Pick]:
    if isinstance(group, Pick):
        return [group]
    if isinstance(group, type):
        return [Pick(group)]
    return [Pick(cls) for cls in group]


def _finite(value: float | None) -> float | None:
    """NaN and inf parse as floats; as an alpha or a hyper-parameter they would reach the adapter: a usage error."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _is_bool(hint: object) -> bool:
    return hint is bool or bool in typing.get_args(hint)


def parameters(pick: Pick) -> list[inspect.Parameter]:
    """The Typer parameters of one options class's flags."""
    hints = typing.get_type_hints(pick.cls)
    params = []
    for f in flag_fields(pick.cls):
        if pick.only is not None and f.name not in pick.only:
            continue
        flag = flag_of(f)
        help_text = pick.helps.get(f.name, flag.help)
        required = f.default is MISSING
        finite = _finite if float in typing.get_args(hints[f.name]) or hints[f.name] is float else None
        # An on/off flag takes no value: Typer would show one ("<bool>") unless told there is none.
        metavar = flag.metavar if flag.metavar is not None or not _is_bool(hints[f.name]) else ""
        info = typer.Option(*flag.names, help=help_text, metavar=metavar, show_default=not required, callback=finite)
        default = inspect.Parameter.empty if required else f.default
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[hints[f.name], info]
            )
        )
    return params


def with_options(**overrides: Group) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace each parameter of the command typed with an options class by that class's flags (or by what
    `overrides` gives for it: a Pick, or several classes for a dict of instances by class)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        members: dict[str, list[tuple[type, list[str]]]] = {}
        params: list[inspect.Parameter] = []
        signature = inspect.signature(command, eval_str=True).parameters.values()
        groups = {p.name: overrides.get(p.name, p.annotation) for p in signature if _is_group(p, overrides)}
        for param in signature:
            if param.name not in groups:
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
                continue
            members[param.name] = []
            for pick in _picks(groups[param.name]):
                flags = parameters(pick)
                members[param.name].append((pick.cls, [p.name for p in flags]))
                params += flags
        names = [p.name for p in params]
        duplicated = {n for n in names if names.count(n) > 1}
        assert not duplicated, f"flags declared twice: {duplicated}"  # every option has one owner

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            for name, classes in members.items():
                built = {cls: cls(**{flag: kwargs.pop(flag) for flag in flags}) for cls, flags in classes}
                group = groups[name]
                kwargs[name] = built if not isinstance(group, (type, Pick)) else next(iter(built.values()))
            return command(**kwargs)

        del run.__wrapped__  # Typer reads the signature below, not the command's
        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {param.name: param.annotation for param in params}
        return run

    return decorate
