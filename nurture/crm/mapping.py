"""Field mapping from lead fields to CRM properties, configured in YAML.

```yaml
hubspot:                       # one section per connector
  email: email                 # lead field -> CRM property
  first_name: {property: firstname, transform: title}
  company: {property: company, transform: [{truncate: 100}, {default: Unknown}]}
  attributes.industry: {property: industry, transform: lower}
```

Transforms are ``upper``, ``lower``, ``title``, ``strip``, ``{default: X}`` and
``{truncate: N}``, applied in order. Mapping is a pure function over a
:class:`~nurture.crm.PromotionItem`, tested without I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nurture.crm import PromotionItem

LEAD_FIELDS = frozenset(
    {
        "email",
        "first_name",
        "last_name",
        "company",
        "source",
        "stage",
        "behaviour_score",
        "fit_score",
        "grade",
        "lead_id",
    }
)
SIMPLE_TRANSFORMS = frozenset({"upper", "lower", "title", "strip"})


class MappingError(ValueError):
    """A mapping file or section is wrong; the message names the file, key and problem."""


@dataclass(frozen=True)
class FieldRule:
    """One lead field -> one CRM property, with transforms applied in order."""

    field: str
    property: str
    transforms: tuple[tuple[str, Any], ...] = ()


def _transform(value: Any, name: str, arg: Any) -> Any:
    if name == "default":
        return arg if value is None or value == "" else value
    if value is None:
        return None
    if name == "truncate":
        return str(value)[: int(arg)]
    text = str(value)
    return {"upper": text.upper, "lower": text.lower, "title": text.title, "strip": text.strip}[
        name
    ]()


def _parse_transforms(raw: Any, where: str) -> tuple[tuple[str, Any], ...]:
    items = raw if isinstance(raw, list) else [raw]
    out: list[tuple[str, Any]] = []
    for t in items:
        if isinstance(t, str) and t in SIMPLE_TRANSFORMS:
            out.append((t, None))
        elif isinstance(t, dict) and len(t) == 1 and next(iter(t)) in ("default", "truncate"):
            name, arg = next(iter(t.items()))
            if name == "truncate" and (not isinstance(arg, int) or arg < 1):
                raise MappingError(f"{where}: truncate expects a positive integer, got {arg!r}")
            out.append((name, arg))
        else:
            raise MappingError(
                f"{where}: unknown transform {t!r}; expected one of "
                "upper, lower, title, strip, {default: X}, {truncate: N}"
            )
    return tuple(out)


def parse_mapping(doc: Mapping[str, Any], where: str = "mapping") -> list[FieldRule]:
    """Field rules from one connector's mapping section (``where`` names it in errors)."""
    if not isinstance(doc, Mapping):
        raise MappingError(f"{where}: expected a mapping of lead field -> CRM property")
    rules: list[FieldRule] = []
    for field_name, spec in doc.items():
        key = f"{where}.{field_name}"
        if field_name not in LEAD_FIELDS and not str(field_name).startswith("attributes."):
            raise MappingError(
                f"{key}: unknown lead field; expected one of {', '.join(sorted(LEAD_FIELDS))} "
                "or attributes.<key>"
            )
        if isinstance(spec, str):
            rules.append(FieldRule(field_name, spec))
        elif isinstance(spec, Mapping) and isinstance(spec.get("property"), str):
            extra = set(spec) - {"property", "transform"}
            if extra:
                raise MappingError(f"{key}: unknown keys {sorted(extra)}")
            transforms = _parse_transforms(spec.get("transform", []), f"{key}.transform")
            rules.append(FieldRule(field_name, spec["property"], transforms))
        else:
            raise MappingError(f"{key}: expected a property name or {{property:, transform:}}")
    return rules


def load_mapping(path: Path, connector: str) -> list[FieldRule] | None:
    """The rules for ``connector`` in the YAML file ``path``, or None if it has no section."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise MappingError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(doc, Mapping):
        raise MappingError(f"{path}: expected a mapping of connector name -> field mapping")
    if connector not in doc:
        return None
    return parse_mapping(doc[connector], f"{path}: {connector}")


def lead_value(item: PromotionItem, field_name: str) -> Any:
    """The value of a lead field (or ``attributes.<key>``) on a promotion item."""
    if field_name.startswith("attributes."):
        return item.attributes.get(field_name.split(".", 1)[1])
    return getattr(item, field_name)


def apply_mapping(item: PromotionItem, rules: list[FieldRule]) -> dict[str, Any]:
    """CRM properties for ``item``; properties whose value ends up None are left out."""
    out: dict[str, Any] = {}
    for rule in rules:
        value = lead_value(item, rule.field)
        for name, arg in rule.transforms:
            value = _transform(value, name, arg)
        if value is not None:
            out[rule.property] = value
    return out
