"""Stage configuration: dataclasses, a YAML file, and ``--set key=value`` overrides.

Every command has one dataclass. Nested dataclasses are addressed with dotted keys
(``caption.backend=openai``). A dataclass may list keys it renamed in a ``RENAMED`` class
attribute (old -> new) and keys it dropped in ``REMOVED`` (key -> what to do instead), so old
config files get a one-line pointer. Unknown keys
and wrong types are user mistakes, so they raise
:class:`ConfigError` with a one-line message naming the key and the valid choices; the CLI
prints it without a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from lvr.errors import LvrError
from lvr.secrets import redact

T = TypeVar("T")


class ConfigError(LvrError, ValueError):
    """A bad config file, key or value (one line, actionable)."""


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Build ``cls`` from defaults, then a YAML file, then ``key=value`` overrides (later wins).

    Args:
        cls: A dataclass type.
        path: Optional YAML file whose mapping mirrors the dataclass fields.
        overrides: ``key=value`` strings; values are parsed as YAML scalars/lists.

    Returns:
        The validated config instance.

    Raises:
        ConfigError: On unknown keys, wrong types, or an unreadable file.
    """
    return from_dict(cls, _read_yaml(Path(path)) if path is not None else {}, overrides)


def from_dict(
    cls: type[T], data: dict[str, Any], overrides: list[str] | None = None, prefix: str = ""
) -> T:
    """Build ``cls`` from a nested mapping (as a YAML file would hold), then ``key=value`` overrides.

    ``prefix`` is where the mapping sits in a larger config (``caption.options.``), for messages.

    Raises:
        ConfigError: On unknown keys or wrong types, as :func:`load_config`.
    """
    data = json.loads(json.dumps(data, default=str))  # deep copy; overrides must not mutate it
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value")
        _set_dotted(data, key.strip(), _Override(raw, _parse_scalar(raw)))
    return _build(cls, data, prefix=prefix)


@dataclasses.dataclass(frozen=True)
class _Override:
    """A ``--set`` value: the text as typed and its YAML reading; the key's type picks one.

    A text key takes the text as written: read as YAML, ``prompt_text=Describe dish #1`` lost
    everything from ``#`` (a comment), ``prompt_version=1.10`` became ``1.1``, ``model=0123``
    became ``83`` (octal), all silently. Other keys (numbers, lists, sections) take the YAML value.
    """

    raw: str
    parsed: Any

    def __repr__(self) -> str:  # messages quote a value as the user's YAML reads it
        return repr(self.parsed)

    def for_type(self, tp: Any) -> Any:
        """The value ``tp`` should see."""
        text = self.raw.strip()
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        if quoted or not _is_text_type(tp) or (self.parsed is None and _allows_none(tp)):
            return self.parsed  # YAML quotes are the user's own escape; null stays null
        return text  # as typed, less the spaces around it (as YAML drops them)


def _plain(value: Any) -> Any:
    """``value`` with the ``--set`` values inside untyped mappings as YAML read them."""
    if isinstance(value, _Override):
        return value.parsed
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _is_text_type(tp: Any) -> bool:
    """``str`` or ``Path``, or an optional one (``str | None``)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return bool(args) and all(a in (str, Path) for a in args)
    return tp in (str, Path)


def _allows_none(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(
            f"config file {path} is a directory; pass a YAML file (e.g. configs/sft/tiny_cpu.yaml)"
        )
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys, got {type(data).__name__}"
        )
    return data


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line saying what is wrong in a YAML text and where (1-based line and column).

    The first line of PyYAML's message ("mapping values are not allowed here") names no place;
    the place is on a later line, which a one-line error would drop.
    """
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    hint = " (quote a text that holds ': ')" if "mapping values are not allowed" in problem else ""
    return f"{where}{problem}{hint}"


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, _Override):  # a section set whole earlier (--set qa={...})
            child = node[part] = child.parsed
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _build(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})
    removed: dict[str, str] = getattr(cls, "REMOVED", {})
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in renamed and key not in fields:
            raise ConfigError(
                f"config key '{prefix}{key}' was renamed to '{prefix}{renamed[key]}'; "
                "update the file or the --set"
            )
        if key in removed and key not in fields:
            raise ConfigError(f"config key '{prefix}{key}' was removed: {removed[key]}")
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + key, list(fields), prefix))
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:  # a value check of the class itself: its message is the whole story
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def _unknown_key_message(key: str, valid: list[str], prefix: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return f"unknown config key '{key}'{hint}; valid keys: {', '.join(prefix + v for v in valid)}"


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check/convert one value against a type hint; raise ConfigError naming ``key``."""
    if isinstance(value, _Override):
        value = value.for_type(tp)
    origin = get_origin(tp)
    if tp is Any:
        return _plain(value)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if errors else f"config key '{key}' has an invalid value {value!r}"
        )
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}"
            )
        return value
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):  # allow comma lists on the command line: frames=8,16,32
            value = [_parse_scalar(v) for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return _plain(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"config key '{key}' is a section; set its fields as {key}.<field>=..."
            )
        return _build(tp, value, prefix=key + ".")
    return _coerce_plain(tp, value, key)


def _coerce_plain(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"config key '{key}' expects a path, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-safe dict of a config (paths become strings), secrets redacted.

    Every manifest, config dump and experiment-tracker config goes through here, so API keys
    (``api_key`` anywhere in the tree, the environment's keys, URL passwords) never reach a file;
    see :mod:`lvr.secrets`.
    """

    def clean(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return redact(clean(dataclasses.asdict(cfg)))


def to_yaml(cfg: Any) -> str:
    """The effective config as YAML (what ``--show-config`` prints).

    Non-ASCII text stays as written (a French category name reads ``étape``, not ``"\\xE9tape"``),
    so the printed config can be compared with the file and pasted back.
    """
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def config_hash(cfg: Any) -> str:
    """Stable 16-hex-digit hash of a config, recorded in every manifest.

    Computed on the redacted config: rotating an API key changes no hash (and the hash of a short
    key cannot be brute-forced out of a manifest).
    """
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def resolve_cli_config(
    cls: type[T], config: Path | None, sets: list[str] | None, show: bool
) -> T | None:
    """The config a command runs with; prints it as YAML and returns None for ``--show-config``."""
    cfg = load_config(cls, config, sets)
    if show:
        print(to_yaml(cfg), end="")
        return None
    return cfg
