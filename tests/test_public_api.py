"""The public API of ``nurture`` and the one root of the errors a user sees."""

from __future__ import annotations

import subprocess
import sys

import pytest

import nurture
from nurture.crm import ConnectorError
from nurture.engagement.events import EventError
from nurture.engagement.inbox import InboxError
from nurture.errors import ConfigError, NurtureError
from nurture.intake.leads import LeadFileError
from nurture.message.mime import HeaderInjectionError
from nurture.message.rendering import RenderError
from nurture.message.tokens import TokenError
from nurture.reporting.explain import LeadNotFound
from nurture.spec.schema import SpecErrors, SpecProblems
from nurture.spec.yamlfile import YamlError


def test_every_public_name_resolves() -> None:
    for name in nurture.__all__:
        assert getattr(nurture, name) is not None, name
    with pytest.raises(AttributeError):
        _ = nurture.no_such_name


def test_import_nurture_stays_cheap() -> None:
    """The CLI and the spool recorder import the package; the API loads on first use."""
    code = "import sys, nurture; print('sqlalchemy' in sys.modules, 'jinja2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "error",
    [
        ConfigError,
        ConnectorError,
        EventError,
        HeaderInjectionError,
        InboxError,
        LeadFileError,
        LeadNotFound,
        RenderError,
        SpecErrors,
        SpecProblems,
        TokenError,
        YamlError,
    ],
)
def test_user_errors_share_one_root(error: type[Exception]) -> None:
    assert issubclass(error, NurtureError)
