"""The typed settings: built once from the merged config (``build``), read by attribute everywhere after.

``sections`` holds every field (type, default, constraint, doc, kind); this module turns a config dict into
``Settings`` with one-line errors naming the key, and prints the JSON schema that is generated from the
sections (``python -m dpogen.settings``) for editors and readers.
"""

from __future__ import annotations

from pydantic import ValidationError

from .sections import (DPO, HF, SFT, Data, Gaussian, Model, Report, Resources, Scratch, Section, Settings, Synthetic,
                       Theory)

__all__ = ["DPO", "HF", "SFT", "Data", "Gaussian", "Model", "Report", "Resources", "Scratch", "Section", "Settings",
           "ConfigError", "Synthetic", "Theory", "build", "message", "THEORY_FROM_DPO"]

# what the theory stage reads of the dpo settings (its other inputs are the dpo stage's outputs)
THEORY_FROM_DPO = ("beta", "loss", "label_smoothing", "lr", "optimizer", "batch_size", "weight_decay",
                   "max_grad_norm", "schedule", "warmup_steps", "regime", "dtype")


class ConfigError(ValueError):
    pass


def build(config: dict, where: str = "") -> Settings:
    """``config`` (a merged config dict) as typed settings, defaults filled in; a bad key or value raises
    ConfigError with one line naming it (``where``, e.g. 'run k2', is added to the message)."""
    try:
        return Settings.model_validate(config)
    except ValidationError as e:
        raise ConfigError(message(e) + (f" ({where})" if where else "")) from None


def message(e: ValidationError) -> str:
    """One line for the first error: the key, the value (cut short) and what is allowed; an unknown key named
    with the keys its section knows."""
    errors = e.errors()
    err = _first(errors)
    loc = _key(err)
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        section = ".".join(str(p) for p in loc[:-1])
        known = sorted(_section_of(loc[:-1]).model_fields) if _section_of(loc[:-1]) else []
        where = f" in {section}" if section else ""
        return f"unknown key(s) {loc[-1]}{where}" + (f"; known: {', '.join(known)}" if known else "")
    if err["type"] == "missing":
        return f"{key}: missing (required)"
    value = repr(err.get("input"))
    value = value if len(value) <= 80 else value[:77] + "..."
    # a union (an integer or 'full'): what each of its members asks, in one line
    asks = list(dict.fromkeys(_ask(x["msg"]) for x in errors if _key(x) == loc))
    return f"{key} = {value}: {'; or '.join(asks)}"


def _ask(msg: str) -> str:
    """pydantic's 'Input should be ...' as 'should be ...' (the key and value are already named)."""
    for lead in ("Input ", "String ", "Value error, "):
        msg = msg.removeprefix(lead)
    return msg


def _key(err: dict) -> list:
    return [p for p in err["loc"] if not _is_branch(p)]


def _is_branch(part) -> bool:
    """Pydantic names the member of a union it tried ('int', "literal['full']", 'Axis'): not a key."""
    return isinstance(part, str) and (part[:1].isupper() or "[" in part or "-" in part or part in (
        "int", "str", "float", "bool", "list", "dict", "none"))


def _first(errors: list[dict]) -> dict:
    """The error a user should read first: an unknown key, else the deepest (first of equals)."""
    for err in errors:
        if err["type"] == "extra_forbidden":
            return err
    return max(errors, key=lambda err: len(_key(err)))  # the most specific: a list's bad item, not the list


def _section_of(loc) -> type[Section] | None:
    cls = Settings
    for part in loc:
        field = cls.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        cls = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, Section)),
                   None)
        if cls is None:
            return None
    return cls


def schema() -> dict:
    """The JSON schema of the whole configuration, generated from the sections."""
    return Settings.model_json_schema()
