"""The method registry.

Methods register themselves with `@register`; the registry finds them by importing every
module of the `methods` package (so adding a method adds no line anywhere else) and every
entry point in the group `repa_zoo.methods` (so another package can ship a method). The core
never imports a method by name.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path
from importlib.metadata import entry_points

from zoo.errors import ConfigError

ENTRY_POINT_GROUP = "repa_zoo.methods"
_METHODS: dict[str, type] = {}
_discovered = False


def register(cls):
    """Class decorator: make a Method subclass available as `zoo train --method <cls.name>`."""
    name = getattr(cls, "name", None)
    if not name or not name.isidentifier():
        raise ValueError(f"{cls.__qualname__}.name must be a Python identifier, got {name!r}")
    existing = _METHODS.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _METHODS[name] = cls
    return cls


def discover() -> None:
    """Import the built-in `methods` package and the installed entry points, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    try:
        package = importlib.import_module("methods")
    except ModuleNotFoundError:
        package = None
    if package is not None:
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"methods.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()  # loading the module runs its @register; a class object is registered too
        if isinstance(obj, type):
            register(obj)


def available_methods() -> dict[str, type]:
    discover()
    return dict(sorted(_METHODS.items()))


def get_method_class(name: str) -> type:
    methods = available_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(methods) or '(none)'}")
    return methods[name]


def method_summaries() -> dict[str, str]:
    """{name: description} of every method, read from the source of the built-in methods without importing them
    (which imports torch: seconds of a cold start); entry-point methods, and any built-in method whose name or
    description is not a plain string, are imported."""
    spec = importlib.util.find_spec("methods")
    summaries, unreadable = {}, False
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(folder).glob("[!_]*.py")):
            found, complete = _registered_in(path.read_text())
            summaries.update(found)
            unreadable = unreadable or not complete
    if unreadable or list(entry_points(group=ENTRY_POINT_GROUP)):
        return {name: cls.description for name, cls in available_methods().items()}
    return dict(sorted(summaries.items()))


def _registered_in(source: str) -> tuple[dict, bool]:
    """({name: description} of the @register classes in `source`, whether every one of them could be read)."""
    found, complete = {}, True
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        if not any(isinstance(d, ast.Name) and d.id == "register" for d in node.decorator_list):
            continue
        values = {target.id: stmt.value.value for stmt in node.body if isinstance(stmt, ast.Assign)
                  for target in stmt.targets if isinstance(target, ast.Name) and isinstance(stmt.value, ast.Constant)}
        if isinstance(values.get("name"), str) and isinstance(values.get("description"), str):
            found[values["name"]] = values["description"]
        else:
            complete = False
    return found, complete


def prepare_target_summaries() -> dict[str, tuple[str, str]]:
    """{target: (method, help)} of every method's `prepare_targets`, read from the source of the built-in methods
    without importing them (as `method_summaries`); entry-point methods, or a built-in one whose targets are not a
    literal dict, are imported."""
    spec = importlib.util.find_spec("methods")
    found, readable = {}, True
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(folder).glob("[!_]*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ClassDef) or not any(
                        isinstance(d, ast.Name) and d.id == "register" for d in node.decorator_list):
                    continue
                values = {target.id: stmt.value for stmt in node.body if isinstance(stmt, ast.Assign)
                          for target in stmt.targets if isinstance(target, ast.Name)}
                if "prepare_targets" not in values:
                    continue
                try:
                    targets, name = ast.literal_eval(values["prepare_targets"]), ast.literal_eval(values["name"])
                    found.update({target: (name, str(text)) for target, text in dict(targets).items()})
                except (ValueError, KeyError, TypeError):
                    readable = False
    if not readable or list(entry_points(group=ENTRY_POINT_GROUP)):
        return {target: (name, text) for name, cls in available_methods().items()
                for target, text in cls.prepare_targets.items()}
    return dict(sorted(found.items()))

