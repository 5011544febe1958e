"""pydantic's validation errors as one :class:`ConfigError` that names the field.

Every settings file a user writes (deployment, latency profile, API-key file, workload
spec) is validated by a pydantic model; :func:`config_error` turns the first problem
into ``ConfigError(field, reason)``, with the field written as a user reads it
(``roles[1].device``, ``keys[2].weight``) and the reason in plain words. An unknown key
is reported before anything else: a misspelt key also makes a required one missing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from disagg.errors import ConfigError


def config_error(
    exc: ValidationError,
    *,
    source: str | None = None,
    where: str = "",
    model: type[BaseModel] | None = None,
) -> ConfigError:
    """The first problem in ``exc`` as a ConfigError.

    ``where`` prefixes the field (the place of the validated value in a larger file);
    ``source`` (a file name) is named after the reason, with a count of further
    problems; ``model``, the validated model, lets an unknown key list the allowed ones.
    A validator that raised a ConfigError names its field relative to where it ran."""
    errors = exc.errors(include_url=False)
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [part for part in first["loc"] if part != "[key]"]  # a bad key: name the key
    field = field_path([where, *loc] if where else loc)
    kind, cause = first["type"], first.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):
        field = field_path([field, cause.field]) if field else cause.field
        reason = cause.reason
    elif isinstance(cause, ValueError):
        reason = str(cause)
    elif kind == "missing":
        reason = "required"
    elif kind == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        reason = "unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    elif kind in ("model_type", "dict_type"):
        reason = f"must be a mapping, got {short_repr(first.get('input'))}"
    else:
        msg = first["msg"].replace("Input should", "must", 1)
        reason = f"{msg}, got {short_repr(first.get('input'))}"
    if source is not None:
        more = f", and {len(errors) - 1} more problems" if len(errors) > 1 else ""
        reason = f"{reason} (in {source}{more})"
    return ConfigError(field or source or "value", reason)


def field_path(loc: list[int | str] | tuple[int | str, ...]) -> str:
    """pydantic's ``('keys', 2, 'weight')`` → ``keys[2].weight``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:  # a name, or an already-joined path such as "[2].max_batch"
            out += f".{part}" if out and not str(part).startswith("[") else str(part)
    return out


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields_at(model: type[BaseModel] | None, loc: list[int | str]) -> list[str]:
    """The field names of the model found by walking ``loc`` into ``model``; empty where
    the walk leaves pydantic models (a list of unions, a dict of scalars)."""
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue  # an index into a list field: the element model is the field's
        info = model.model_fields.get(str(part))
        model = _model_in(info.annotation) if info is not None else None
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The one pydantic model an annotation holds (``M``, ``list[M]``, ``M | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = [m for arg in getattr(annotation, "__args__", ()) if (m := _model_in(arg))]
    return found[0] if len(found) == 1 else None
