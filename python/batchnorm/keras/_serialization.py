"""Keras-style (de)serialization shared by initializers, regularizers and constraints.

tf-keras serializes such objects as ``{"module": "keras.<kind>s", "class_name": ...,
"config": {...}, "registered_name": None}`` and reads that form back, as well as a bare
name (``"l2"``) or ``{"class_name": ..., "config": ...}`` without the other keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def serialize_object(obj: Any, module: str, base: type, kind: str) -> dict[str, Any] | None:
    if obj is None:
        return None
    if isinstance(obj, base):
        return {
            "module": module,
            "class_name": type(obj).__name__,
            "config": obj.get_config(),  # type: ignore[attr-defined]
            "registered_name": None,
        }
    raise ValueError(
        f"cannot serialize the {kind} {obj!r}: only batchnorm's built-in {kind}s have a Keras config; "
        f"pass a {base.__name__} subclass with get_config() or a built-in name"
    )


def deserialize_object(config: Any, classes: dict[str, type], names: dict[str, type], kind: str) -> Any:
    if isinstance(config, str):
        cls = names.get(config) or classes.get(config)
        if cls is None:
            known = ", ".join(sorted(names))
            raise ValueError(f"Unknown {kind}: {config!r}. Known names: {known}")
        return cls()
    if isinstance(config, dict) and "class_name" in config:
        name = config["class_name"]
        cls = classes.get(name) or names.get(name)
        if cls is None:
            raise ValueError(f"Unknown {kind} class_name: {name!r}")
        params = config.get("config") or {}
        if not isinstance(params, dict):
            raise TypeError(f"the config of a serialized {kind} must be a dict, got {params!r}")
        return cls.from_config(dict(params))  # type: ignore[attr-defined]
    raise ValueError(f"Could not interpret serialized {kind}: {config!r}")


def get_object(identifier: Any, base: type, deserialize: Callable[[Any], Any], kind: str) -> Any:
    """The ``get`` of each family: None and instances as they are, names and dicts
    deserialized, other callables as they are."""
    if identifier is None or isinstance(identifier, base):
        return identifier
    if isinstance(identifier, (str, dict)):
        return deserialize(identifier)
    if callable(identifier):
        return identifier
    raise ValueError(f"Could not interpret {kind} identifier: {identifier!r}")
