"""The settings machinery: typed settings classes, their environment variables and their flags.

Each service owns one settings class (:mod:`blockmgr.config`, :mod:`executor.config`,
:mod:`gateway.settings`), a pydantic-settings ``BaseSettings`` built from :class:`ServiceSettings`.
Every field is defined once, with :func:`setting`: one type, one default, one help text and one
environment variable, ``PAGEDSERVE_<FIELD>`` unless ``env=`` names another (the names compose.yaml
uses). This module derives the rest from those fields:

- :class:`SettingsParser` builds the ``argparse`` flags (``--field-name`` unless ``flag=`` names
  another; a bool field gets two, the one that turns it from its default and its twin that sets
  the default back: ``--no-prefix-caching``, ``--prefix-caching``) and builds the settings
  object: flags win over the environment, which wins over the defaults. A bad value exits with
  status 2 and a message naming the flag (or the variable) it came from.
- :func:`to_env` / :func:`environment_for` turn a settings object back into environment
  variables, which is how ``pagedserve serve`` hands each child process its settings.

It lives in blockmgr/ because that package is the bottom of the import graph (every service
already imports :mod:`blockmgr.security`); it imports nothing from the services.
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "PAGEDSERVE_"


class Separated:
    """Annotated marker of a list setting whose items are joined by ``sep`` in its environment variable.

    On the command line the flag takes one or more values and may be repeated; each value may
    itself hold several items joined by ``sep`` (``--workload a,b`` = ``--workload a b``).
    """

    def __init__(self, sep: str):
        self.sep = sep

    def split(self, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return value
        out = []
        for item in value:
            if isinstance(item, str):
                out += [part.strip() for part in item.split(self.sep.strip() or None) if part.strip()]
            else:
                out.append(item)
        return out


def separated_list(sep: str, item: type = str, check: Any = None) -> Any:
    """A ``list[item]`` setting whose environment variable joins the items by ``sep`` (``" "``, ``","``).

    Args:
        check: a function validating (and possibly rewriting) the parsed list; raises ValueError.
    """
    marker = Separated(sep)
    validators = [BeforeValidator(marker.split)] + ([AfterValidator(check)] if check else [])
    return Annotated[list[item], NoDecode, marker, *validators]


SpaceList = separated_list(" ")
CommaList = separated_list(",")


def setting(default: Any = ..., help: str = "", *, flag: str | None = None, env: str | None = None,
            old_flags: tuple[str, ...] = (), default_factory=None, **constraints) -> Any:
    """One setting: a pydantic ``Field`` with its help text, and its flag / variable when not the usual.

    Args:
        default: the default (``...``: required).
        help: the help text (the field's description), shown by ``--help``.
        flag: the flag, when not ``--`` + the field name with dashes. For a bool, the flag that turns
            it from its default (e.g. ``--no-prefix-caching``); its twin, which sets the default back
            over a variable (``--prefix-caching``, see :func:`bool_twin`), comes with it.
        env: the environment variable, when not ``PAGEDSERVE_`` + the field name in capitals.
        old_flags: former spellings still accepted (listed in ``--help`` next to the flag).
        constraints: pydantic constraints (``ge``, ``gt``, ``le``, ``lt``).
    """
    extra = {k: v for k, v in (("flag", flag), ("old_flags", list(old_flags) or None)) if v}
    kwargs = dict(description=help, validation_alias=env, json_schema_extra=extra or None, **constraints)
    if default_factory is not None:
        return Field(default_factory=default_factory, **kwargs)
    return Field(default, **kwargs)


# Every settings class's pydantic-settings configuration, but for its variables' prefix: init
# values by field name, unknown ones refused, defaults validated too.
SETTINGS_CONFIG = dict(validate_by_name=True, validate_by_alias=True, extra="forbid", validate_default=True)


class DeclaredEnvSource(EnvSettingsSource):
    """The environment, read under each setting's one variable only.

    With ``validate_by_name`` (init values by field name), pydantic-settings would read a field
    that declares its own variable (``env=``) under ``PAGEDSERVE_<FIELD>`` as well, e.g.
    ``PAGEDSERVE_SWAP_SPACE`` beside ``PAGEDSERVE_SWAP_SPACE_GIB``: an undocumented second name,
    and errors naming the variable the user did not set.
    """

    def _extract_field_info(self, field: FieldInfo, field_name: str) -> list[tuple[str, str, bool]]:
        names = super()._extract_field_info(field, field_name)
        return names[:1] if field.validation_alias else names


class KeysDirSettings(BaseSettings):
    """The CURVE keys directory (see :mod:`blockmgr.security`); the base of every service's settings."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, **SETTINGS_CONFIG)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, DeclaredEnvSource(settings_cls), dotenv_settings, file_secret_settings

    keys_dir: str | None = setting(None, "CURVE keys directory; create one with `pagedserve keys` (`serve` and "
                                         "`keys` default to ~/.cache/pagedserve/keys)")


class ServiceSettings(KeysDirSettings):
    """What every service has: its log level and its CURVE keys, or none on loopback."""

    log_level: str = setting("INFO", "logging level: DEBUG, INFO, WARNING, ERROR")
    insecure_local: bool = setting(False, "run without keys: no authentication or encryption, loopback addresses only")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        value = value.upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"unknown logging level {value!r}; expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value


def settings_fields(cls: type[BaseSettings]) -> dict[str, FieldInfo]:
    """The fields of a settings class that are settings (``exclude=True`` marks runtime-only state)."""
    return {name: info for name, info in cls.model_fields.items() if not info.exclude}


def _extra(info: FieldInfo) -> dict:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def reuse(cls: type[BaseModel], name: str, **changes: Any) -> Any:
    """Field ``name`` of settings class ``cls``, to declare in another class (e.g. a benchmark's).

    It keeps its type constraints, help text and variable name (a class with another
    ``env_prefix`` reads it under that prefix). ``changes``: e.g. ``default=`` where the other
    class's use needs another default.
    """
    info = cls.model_fields[name]
    return FieldInfo.merge_field_infos(info, **changes)


def env_name(cls: type[BaseModel], name: str) -> str:
    """The environment variable of field ``name``."""
    alias = cls.model_fields[name].validation_alias
    if isinstance(alias, str):
        return alias
    return (cls.model_config.get("env_prefix") or ENV_PREFIX) + name.upper()


def flag_name(cls: type[BaseSettings], name: str) -> str:
    """The command-line flag of field ``name``."""
    return _extra(cls.model_fields[name]).get("flag") or "--" + name.replace("_", "-")


def bool_twin(flag: str) -> str:
    """The flag that undoes bool flag ``flag``: ``--no-x`` for ``--x``, ``--x`` for ``--no-x``."""
    return "--" + flag.removeprefix("--no-") if flag.startswith("--no-") else "--no-" + flag.removeprefix("--")


class _BoolFlags(argparse.Action):
    """A bool setting's flags: the declared one (and its old spellings) stores ``const``, its twin,
    the last of ``option_strings``, stores the opposite. Like ``argparse.BooleanOptionalAction``,
    but the declared flag may be the ``--no-`` one or a name of its own (``--shared-prefix-cache``),
    so that a variable's value can be overridden either way while the help describes the declared flag.
    """

    def __init__(self, option_strings: list[str], dest: str, const: bool, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.const != (option_string == self.option_strings[-1]))


def _separator(info: FieldInfo) -> Separated | None:
    return next((m for m in info.metadata if isinstance(m, Separated)), None)


def _choices(annotation: Any) -> list[str] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is Literal:
            return [str(c) for c in typing.get_args(arg)]
    return None


def _is(annotation: Any, kind: type) -> bool:
    return annotation is kind or typing.get_origin(annotation) is kind


def _metavar(name: str, annotation: Any) -> str:
    if int in (annotation, *typing.get_args(annotation)):
        return "N"
    if float in (annotation, *typing.get_args(annotation)):
        return "X"
    return name.rsplit("_", 1)[-1].upper()


def to_env(settings: BaseSettings) -> dict[str, str]:
    """Environment variables that rebuild ``settings`` in another process (fields left None are left out).

    Returns:
        ``{"PAGEDSERVE_...": value}``: bools as ``true`` / ``false``, lists joined by their
        separator, everything else as ``str(value)``.
    """
    cls = type(settings)
    out = {}
    for name, info in settings_fields(cls).items():
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list):
            sep = _separator(info)
            if sep is None:
                raise TypeError(f"{cls.__name__}.{name}: a list setting needs separated_list()")
            text = sep.sep.join(value)
        else:
            text = str(value)
        out[env_name(cls, name)] = text
    return out


def environment_for(settings: BaseSettings, base: dict[str, str]) -> dict[str, str]:
    """The environment of a process that should rebuild ``settings``: ``base`` with every variable of
    ``settings``' class replaced by :func:`to_env`'s (one left None is removed, not inherited).

    Other variables of ``base`` pass through, e.g. ``PAGEDSERVE_CACHE_DIR``, which is not a setting.
    """
    cls = type(settings)
    own = {env_name(cls, name) for name in settings_fields(cls)}
    return {**{k: v for k, v in base.items() if k not in own}, **to_env(settings)}


class _ConciseParser(argparse.ArgumentParser):
    """argparse, but an error prints one line and a pointer to ``--help`` instead of the whole usage
    (``pagedserve serve``'s runs to two dozen lines above the one line that says what is wrong)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the flags)\n")


class SettingsParser:
    """The ``argparse`` parser of one or more settings classes, and the objects built from it.

    ``add`` adds a class's fields as flags (each field name once: a field two classes share, such
    as ``log_level``, becomes one flag whose value goes to both); ``parse`` reads the command line;
    ``build`` makes a class's settings object from the flags given, the environment and the defaults.

    Example::

        p = SettingsParser("pagedserve blockmgr", "Run the block-manager service.")
        p.add(BlockManagerSettings)
        settings = p.build(BlockManagerSettings, p.parse(argv))
    """

    def __init__(self, prog: str, description: str):
        self.parser = _ConciseParser(prog=prog, description=description)
        self.flags: dict[str, str] = {}  # field name -> its flag

    def add(self, cls: type[BaseSettings], title: str | None = None, skip: set[str] | frozenset = frozenset()) -> None:
        """Add ``cls``'s fields as flags, in a ``--help`` section ``title``; ``skip``: fields not offered."""
        target = self.parser.add_argument_group(title) if title else self.parser
        for name, info in settings_fields(cls).items():
            if name in skip or name in self.flags:
                continue
            flag = flag_name(cls, name)
            self.flags[name] = flag
            help_text = (info.description or "").replace("%", "%%")
            kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS)
            annotation = info.annotation
            default = info.get_default(call_default_factory=True)
            env = "$" + env_name(cls, name)
            flags = [flag, *_extra(info).get("old_flags", ())]
            if annotation is bool:
                flags.append(bool_twin(flag))
                kwargs.update(action=_BoolFlags, const=not default)
                help_text += f" ({flags[-1]} undoes it)"
                env += "=" + ("true" if not default else "false")
            elif _separator(info) is not None:
                kwargs.update(action="extend", nargs="+", metavar=name.upper().removesuffix("S"))
                if default:
                    help_text += f" (default {' '.join(map(str, default))})".replace("%", "%%")
            else:
                choices = _choices(annotation)
                kwargs.update(metavar="{" + ",".join(choices) + "}" if choices else _metavar(name, annotation))
                if default is not None and annotation is not bool:
                    help_text += f" (default {default})".replace("%", "%%")
            help_text += f" [{env}]"
            target.add_argument(*flags, help=help_text, **kwargs)

    def parse(self, argv: list[str] | None) -> dict[str, Any]:
        """The flags given on the command line, as ``{field name: raw value}``."""
        return vars(self.parser.parse_args(sys.argv[1:] if argv is None else argv))

    def error(self, message: str) -> typing.NoReturn:
        """Print ``message`` (and where to find the flags) and exit with status 2."""
        self.parser.error(message)

    def build(self, cls: type[BaseSettings], given: dict[str, Any], **fixed: Any):
        """``cls``'s settings: ``fixed`` values, then the flags ``given``, then the environment, then defaults.

        Exits with status 2 (through :meth:`error`) when a value is invalid, naming its flag, or
        its environment variable when it came from there.
        """
        fields = settings_fields(cls)
        values = {name: value for name, value in given.items() if name in fields}
        values.update(fixed)
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = self._source(cls, first["loc"][0] if first["loc"] else None, values, fixed)
            message = first["msg"].removeprefix("Value error, ")
            self.error(f"{where}: {message}" if where else message)

    def _source(self, cls: type[BaseSettings], loc: Any, values: dict, fixed: dict) -> str | None:
        name = next((n for n in settings_fields(cls) if loc in (n, env_name(cls, n))), None)
        if name is None:
            return None
        if name in values and name not in fixed:
            return self.flags.get(name, flag_name(cls, name))
        if name in fixed:
            return name
        return "$" + env_name(cls, name)


def load(cls: type[BaseSettings], argv: list[str] | None, prog: str, description: str):
    """Parse ``argv`` into ``cls``'s settings (one service's command line). Returns ``(settings, parser)``."""
    parser = SettingsParser(prog, description)
    parser.add(cls)
    return parser.build(cls, parser.parse(argv)), parser
