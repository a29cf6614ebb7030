"""Reading untrusted YAML mappings with errors that name the field path.

Every CR and Kubernetes object goes through `Fields`, so an error always reads
`spec.offloadingConfig.behavior.percentage: must be between 0 and 100, got 150`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FieldError:
    """One problem with one field; `path` is the dotted path from the object root."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass
class Fields:
    """A cursor over one mapping that records errors instead of raising.

    Parsing keeps going after an error so the user sees every problem at once.
    """

    data: Mapping[str, Any]
    path: str = ""
    errors: list[FieldError] = field(default_factory=list)

    @classmethod
    def of(cls, value: Any, path: str, errors: list[FieldError]) -> Fields:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            errors.append(FieldError(path, f"must be a mapping, got {_kind(value)}"))
            value = {}
        return cls(value, path, errors)

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.errors.append(FieldError(self.at(key), message))

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def sub(self, key: str) -> Fields:
        return Fields.of(self.data.get(key), self.at(key), self.errors)

    def items(self, key: str) -> list[Fields]:
        """A list of mappings, each a cursor with its index in the path."""
        return [Fields.of(v, f"{self.at(key)}[{i}]", self.errors) for i, v in enumerate(self.list(key))]

    def list(self, key: str) -> list[Any]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(key, f"must be a list, got {_kind(value)}")
            return []
        return value

    def str(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                self.error(key, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.error(key, f"must be a string, got {_kind(value)}")
            return default
        return str(value)

    def number(self, key: str, default: float | None = None, required: bool = False) -> float | None:
        """A number, also from a Kubernetes quantity string such as "500m" or "2Gi"."""
        value = self.data.get(key)
        if value is None:
            if required:
                self.error(key, "is required")
            return default
        try:
            return parse_quantity(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return default

    def int(self, key: str, default: int | None = None, required: bool = False) -> int | None:
        value = self.data.get(key)
        if value is None:
            if required:
                self.error(key, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    pass
            self.error(key, f"must be an integer, got {value!r}")
            return default
        return value

    def bool(self, key: str, default: bool = False) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.error(key, f"must be true or false, got {value!r}")
            return default
        return value

    def string_map(self, key: str) -> dict[str, str]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.error(key, f"must be a mapping of strings, got {_kind(value)}")
            return {}
        return {str(k): "" if v is None else str(v) for k, v in value.items()}


_SUFFIXES = {
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_quantity(value: Any) -> float:
    """A Kubernetes resource.Quantity ("250m", "1.5Gi", "10") or a YAML number, as a float."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number or quantity, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a number or quantity, got {value!r}")
    text = value.strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], _SUFFIXES[suffix]
            break
    else:
        number, scale = text, 1.0
    try:
        result = float(number) * scale
    except ValueError:
        raise ValueError(f"must be a number or quantity, got {value!r}") from None
    if not math.isfinite(result):
        raise ValueError(f"must be a finite number, got {value!r}")
    return result


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
