"""The base class of every params section."""

import hashlib
import json
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Self, Union

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

_CONTAINERS = (Union, types.UnionType, list, tuple, set, frozenset, dict)


def _mentions(annotation: Any, wanted: tuple[type, ...]) -> bool:
    """Does ``annotation`` name one of ``wanted`` at any depth (through ``Annotated``, unions and
    containers): ``list[Annotated[int, ...]] | None`` mentions int, ``list[str | int | bool]`` bool."""
    if annotation in wanted:
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _mentions(typing.get_args(annotation)[0], wanted)
    if origin in _CONTAINERS:
        return any(_mentions(arg, wanted) for arg in typing.get_args(annotation))
    return False


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds_bool(item) for item in value)
    return False


class Section(BaseModel):
    """A typed section of ``params.yaml``. Unknown keys are errors: a misspelt "learning_rte"
    must not silently fall back to a default. Frozen: a stage cannot change what it was given.

    Numbers must be numbers: YAML reads ``yes``/``on``/``true`` as booleans, and pydantic would
    turn them into 1 or 1.0 (``learning_rate: true`` training at lr 1). Full strict mode is not
    used because PyYAML reads ``5e-4`` (no dot) as a string, which a user means as a number."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Self:
        """This section with the fields ``overrides`` sets (nested as in ``params.yaml``) changed,
        validated again (a bad value raises pydantic's ``ValidationError``): the one merge of a
        variant's ``grit_overrides`` and ``lora_overrides`` and of ``vlm.overrides``."""
        if not overrides:
            return self
        return type(self).model_validate(merged(self.model_dump(), overrides))

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None or not _holds_bool(value):
            return value
        annotation = field.annotation
        # a field that admits booleans on purpose (list[str | int | bool]) keeps them
        if _mentions(annotation, (int, float)) and not _mentions(annotation, (bool,)):
            raise ValueError("must hold numbers, not booleans" if isinstance(value, (list, tuple, set, frozenset))
                             else "must be a number, not a boolean")
        return value


def merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes``: mappings merge key by key, anything else (a list of patterns,
    a number) replaces what was there."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = (merged(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
                    else value)
    return out


def content_hash(section: BaseModel) -> str:
    """Stable digest of a validated section (defaults filled in, key order irrelevant)."""
    canonical = json.dumps(section.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
