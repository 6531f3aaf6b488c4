"""Detector families by name (`base.Family`): YOLOv4 (`families.yolov4`) and the anchor-free GFL
family (`families.gfl`) are built in; another
family registers itself with `register` when its module is imported. A package that provides a
family declares it as an entry point in the group `jaxyolo.families` (name = the family's name,
value = "module:object", the Family instance), so a table naming it works with nothing imported
first: the entry point is loaded on first use.

A model table names its family in a top-level ``family:`` field; a table without one is a YOLOv4
table (every table written before families existed).
"""

from __future__ import annotations

from jaxyolo.errors import ConfigError
from jaxyolo.families.base import Family

DEFAULT = "yolov4"
BUILT_IN = {"yolov4": "jaxyolo.families.yolov4", "gfl": "jaxyolo.families.gfl"}  # imported on first use
ENTRY_POINTS = "jaxyolo.families"
_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make `family` known under `family.name` (again: replaces it). Returns it."""
    if not getattr(family, "name", None):
        raise ConfigError(f"register: {family!r} has no `name`")
    _REGISTRY[family.name] = family
    return family


def get(name: str) -> Family:
    if name in BUILT_IN and name not in _REGISTRY:
        import importlib

        importlib.import_module(BUILT_IN[name])  # registers itself
    if name not in _REGISTRY:
        _load_entry_point(name)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown detector family {name!r}: known {sorted(available())} (a family from another "
                          f"package is found through its '{ENTRY_POINTS}' entry point)")
    return _REGISTRY[name]


def _load_entry_point(name: str) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS, name=name):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - whatever importing a third-party module raises
            raise ConfigError(f"detector family {name!r}: its entry point {ep.value!r} cannot be loaded "
                              f"({type(e).__name__}: {e})") from None
        if name not in _REGISTRY:  # the module may have registered itself on import
            if not isinstance(obj, Family) or obj.name != name:
                raise ConfigError(f"detector family {name!r}: entry point {ep.value!r} is not a Family named {name!r}")
            register(obj)


def model_table(name: str) -> str | None:
    """The table of a model name a family ships (`Family.model_tables`), looking through the
    registered families, then every family of the entry-point group; None when none has it."""
    from importlib.metadata import entry_points

    get(DEFAULT)
    for loaded in (False, True):
        if loaded:
            for ep in entry_points(group=ENTRY_POINTS):
                if ep.name not in _REGISTRY:
                    _load_entry_point(ep.name)
        for family in _REGISTRY.values():
            if name in family.model_tables:
                return str(family.model_tables[name])
    return None


def model_names() -> list[str]:
    """Every model name: jaxyolo's built-in tables and those the registered families ship."""
    from jaxyolo.models.config import available_models

    get(DEFAULT)
    return sorted(set(available_models()) | {n for f in _REGISTRY.values() for n in f.model_tables})


def load_model_table(name) -> tuple[str, dict]:
    """(name, raw table) of a model: a YAML path, a built-in name, or a name a family ships."""
    from pathlib import Path

    from jaxyolo.models.config import available_models, load_table

    if Path(name).suffix in (".yaml", ".yml") or str(name) in available_models():
        return load_table(name)
    shipped = model_table(str(name))
    if shipped is None:
        raise ConfigError(f"unknown model {str(name)!r}: choose one of {', '.join(model_names())} or give a path "
                          "to a .yaml table")
    return str(name), load_table(shipped)[1]


def available() -> list[str]:
    for name in BUILT_IN:
        get(name)
    return sorted(_REGISTRY)


def of_table(table: dict, where: str = "model table") -> Family:
    """The family a raw model table belongs to."""
    name = table.get("family", DEFAULT) if isinstance(table, dict) else DEFAULT
    if not isinstance(name, str):
        raise ConfigError(f"{where}: family must be a name, got {name!r}")
    return get(name)


def of_model(name) -> Family:
    """The family of a built-in model name or a path to a model table."""
    from jaxyolo.models.config import load_table

    table_name, table = load_model_table(name)
    return of_table(table, f"model {table_name!r}")


def of(spec) -> Family:
    """The family of a resolved spec (its class attribute `family`)."""
    return get(getattr(spec, "family", DEFAULT))


__all__ = ["Family", "register", "get", "available", "of_table", "of_model", "of", "DEFAULT"]
