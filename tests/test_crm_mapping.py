"""Field mapping: YAML -> rules -> CRM properties, with located errors (pure, no I/O)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nurture.crm import PromotionItem
from nurture.crm.mapping import MappingError, apply_mapping, load_mapping, parse_mapping

ITEM = PromotionItem(
    promotion_id=1, lead_id=2, email="Ada@Example.COM", stage="mql", first_name="ada",
    last_name=None, company="A" * 300, attributes={"industry": "  SaaS "},
)  # fmt: skip


def test_transforms_apply_in_order(tmp_path: Path) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_text(
        "hubspot:\n"
        "  email: {property: email, transform: lower}\n"
        "  first_name: {property: firstname, transform: title}\n"
        "  last_name: {property: lastname, transform: [{default: unknown}, upper]}\n"
        "  company: {property: company, transform: {truncate: 10}}\n"
        "  attributes.industry: {property: industry, transform: [strip, lower]}\n"
        "  grade: fit_grade\n"
    )
    rules = load_mapping(path, "hubspot")
    assert rules is not None and load_mapping(path, "pipedrive") is None
    assert apply_mapping(ITEM, rules) == {
        "email": "ada@example.com",
        "firstname": "Ada",
        "lastname": "UNKNOWN",
        "company": "A" * 10,
        "industry": "saas",
    }  # grade is None: left out, never sent as null


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"nickname": "x"}, "hubspot.nickname: unknown lead field"),
        ({"email": {"property": "email", "transform": "reverse"}}, "unknown transform 'reverse'"),
        ({"email": {"property": "email", "transform": {"truncate": 0}}}, "positive integer"),
        ({"email": {"prop": "email"}}, "hubspot.email: expected a property name"),
        ({"email": {"property": "email", "when": 1}}, "unknown keys ['when']"),
    ],
)
def test_errors_name_the_key(doc: dict[str, object], message: str) -> None:
    with pytest.raises(MappingError, match=re.escape(message)):
        parse_mapping(doc, "hubspot")


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("hubspot: [unclosed\n")
    with pytest.raises(MappingError, match=r"m\.yaml: invalid YAML"):
        load_mapping(path, "hubspot")
