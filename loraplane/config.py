"""Settings declared once: each field of a frozen dataclass names the variable it is read from.

    @dataclass(frozen=True, kw_only=True)
    class Settings:
        port: int = field(default=8080, metadata=var("LORAPLANE_HTTP_PORT"))
        token: str = field(repr=False, metadata=var("LORAPLANE_TOKEN", secret=True))

    settings = from_env(Settings, os.environ)

A variable that is not set leaves the field's default. A set one is converted by the field's type
(`str`, `int`, `float`, `Path`, `tuple[str, ...]` split like a shell line) or by the `parse` given;
a value that does not convert fails with the variable's name and the value (`ConfigError`). A
secret must be set, to at least 16 characters. A value that depends on other variables or fields
is `derived`: computed after every plain field, from the environment and those fields' values.
`env_names(Settings)` is every variable a class reads, derived ones included.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

S = TypeVar("S", bound="DataclassInstance")
V = TypeVar("V")

KEY = "loraplane.config"  # the key of a field's metadata that holds its Var or Derived
MIN_SECRET = 16

# A derived value, from (the environment, the fields read so far).
Read = Callable[[Mapping[str, str], Mapping[str, Any]], Any]


class ConfigError(ValueError):
    """A variable is missing, or its value is not what its setting takes."""


@dataclass(frozen=True)
class Var:
    """A field read from one variable."""

    name: str
    secret: bool = False  # required, at least MIN_SECRET characters; never shown in an error
    parse: Callable[[str], Any] | None = None  # instead of converting by the field's type


@dataclass(frozen=True)
class Derived:
    """A field computed by `read`, which looks at no variable but `names`."""

    names: tuple[str, ...]
    read: Read


def var(name: str, *, secret: bool = False, parse: Callable[[str], Any] | None = None) -> dict[str, Var]:
    """A field's metadata: read it from the variable `name`."""
    return {KEY: Var(name, secret, parse)}


def derived(names: Iterable[str], read: Read) -> dict[str, Derived]:
    """A field's metadata: compute it with `read`, which reads the variables `names`."""
    return {KEY: Derived(tuple(names), read)}


def from_env(cls: type[S], environ: Mapping[str, str], **given: Any) -> S:
    """An instance of the settings class `cls` read from `environ`; fields in `given` are not read."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(given)
    later: list[tuple[str, Derived]] = []
    for f in dataclasses.fields(cls):
        source = f.metadata.get(KEY)
        if f.name in given or source is None:
            continue
        if isinstance(source, Derived):
            later.append((f.name, source))
        elif source.secret:
            values[f.name] = secret(environ, source.name)
        elif source.name in environ:
            value = environ[source.name]
            values[f.name] = _custom(source, value) if source.parse else parse(source.name, value, hints[f.name])
        elif f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
        else:
            raise ConfigError(f"{source.name} must be set")
    for name, source in later:
        values[name] = source.read(environ, values)
    return cls(**values)


def or_exit(make: Callable[[], V]) -> V:
    """For entry points: the settings `make` builds, or one line on stderr naming the variable and
    its value (no traceback) and exit status 1."""
    try:
        return make()
    except ConfigError as err:
        sys.exit(f"configuration error: {err}")


def env_names(cls: type[DataclassInstance]) -> set[str]:
    """Every variable `from_env(cls, …)` reads."""
    names: set[str] = set()
    for f in dataclasses.fields(cls):
        source = f.metadata.get(KEY)
        if isinstance(source, Var):
            names.add(source.name)
        elif isinstance(source, Derived):
            names.update(source.names)
    return names


def get(environ: Mapping[str, str], name: str, kind: type[V], default: V) -> V:
    """The variable `name` as a `kind`, or `default` when it is not set (for derived fields)."""
    if name not in environ:
        return default
    value: V = parse(name, environ[name], kind)
    return value


def secret(environ: Mapping[str, str], name: str) -> str:
    """The secret in the variable `name`, which must be at least MIN_SECRET characters."""
    value = environ.get(name, "")
    if len(value) < MIN_SECRET:
        raise ConfigError(f"{name} must be set to a secret of at least {MIN_SECRET} characters")
    return value


def parse(name: str, value: str, kind: Any) -> Any:
    """`value`, of the variable `name`, as a `kind`."""
    if kind is str:
        return value
    if kind is Path:
        return Path(value)
    if kind is int:
        return _convert(name, value, int, "not an integer")
    if kind is float:
        return _convert(name, value, float, "not a number")
    if kind == tuple[str, ...]:
        try:
            return tuple(shlex.split(value))
        except ValueError as err:
            raise ConfigError(f"{name}={value!r}: {err}") from None
    raise TypeError(f"{name}: no conversion to {kind!r}; declare the field with parse= or derived()")


def _custom(source: Var, value: str) -> Any:
    assert source.parse is not None
    try:
        return source.parse(value)
    except ValueError as err:
        raise ConfigError(f"{source.name}={value!r}: {err}") from None


def _convert(name: str, value: str, to: Callable[[str], V], expected: str) -> V:
    try:
        return to(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: {expected}") from None
