"""``nurture init`` and the one import namespace, in the development install.

The wheel itself is built and installed into a fresh virtualenv in test_packaging.py.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nurture.config import DEV_SECRET_KEY, PROJECT_ROOT, Settings
from nurture.errors import NurtureError
from nurture.scaffold import SETTING_MEANINGS, STARTER, env_example, init_programme
from nurture.spec.programme import Programme

BIN = Path(sys.executable).parent


def test_init_writes_a_whole_programme(tmp_path: Path) -> None:
    dest = tmp_path / "acme-nurture"
    written = init_programme(dest)
    names = {str(p) for p in written}
    for expected in [
        "campaigns/b2b-inbound-welcome.yaml",
        "campaigns/retail-welcome.yaml",
        "campaigns/scoring.yaml",
        "campaigns/pipeline.yaml",
        "templates/emails/b2b/welcome.html.j2",
        "templates/emails/layouts/base.html.j2",
        "prefect.yaml",
        ".env.example",
        ".gitignore",
        "README.md",
    ]:
        assert expected in names, expected
        assert (dest / expected).is_file() and not (dest / expected).is_symlink()
    # The starter's own file names never leak into the programme.
    assert not (dest / "gitignore").exists() and not (dest / "programme-README.md").exists()
    # The copies are byte for byte the repository's examples.
    for rel in ("campaigns/scoring.yaml", "templates/emails/b2b/welcome.html.j2"):
        assert (dest / rel).read_bytes() == (PROJECT_ROOT / rel).read_bytes()
    programme = Programme.load(dest / "campaigns", dest / "templates" / "emails")
    shipped = Programme.load(PROJECT_ROOT / "campaigns", PROJECT_ROOT / "templates" / "emails")
    assert {c.name for c in programme.campaigns} == {c.name for c in shipped.campaigns}
    assert {"b2b-inbound-welcome", "retail-welcome"} <= {c.name for c in programme.campaigns}


def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "prog"
    (dest / "campaigns").mkdir(parents=True)
    (dest / "README.md").write_text("ours\n")
    (dest / "campaigns" / "scoring.yaml").write_text("# ours\n")
    with pytest.raises(NurtureError, match=r"refusing to overwrite.*README\.md") as info:
        init_programme(dest)
    assert "campaigns/scoring.yaml" in str(info.value)
    assert (dest / "README.md").read_text() == "ours\n"
    assert (dest / "campaigns" / "scoring.yaml").read_text() == "# ours\n"
    assert sorted(p.name for p in dest.rglob("*")) == ["README.md", "campaigns", "scoring.yaml"]

    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(NurtureError, match="not a folder"):
        init_programme(file)


def test_init_command_exit_codes(tmp_path: Path) -> None:
    first = subprocess.run(
        [str(BIN / "nurture"), "init", "prog", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.returncode == 0, first.stderr
    assert "prefect.yaml" in first.stdout
    again = subprocess.run(
        [str(BIN / "nurture"), "init", "prog"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1
    assert "refusing to overwrite existing files" in again.stderr
    assert "Traceback" not in again.stderr


def test_env_example_lists_every_setting_with_its_meaning() -> None:
    assert set(SETTING_MEANINGS) == set(Settings.model_fields)
    text = env_example()
    variables = set(re.findall(r"^([A-Z_]+)=", text, flags=re.M))
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        variable = alias if isinstance(alias, str) else f"NURTURE_{name.upper()}"
        assert variable in variables, variable
    assert "NURTURE_FROM" in variables and "NURTURE_ENV" in variables
    assert DEV_SECRET_KEY not in text
    assert re.search(r"^NURTURE_SECRET_KEY=$", text, flags=re.M)
    # Every variable line is preceded by a comment saying what it means.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z_]+=", line):
            assert lines[i - 1].startswith("# "), line


def test_programme_deployments_run_the_installed_flows() -> None:
    from prefect import Flow

    doc = yaml.safe_load((STARTER / "prefect.yaml").read_text())
    entrypoints = [d["entrypoint"] for d in doc["deployments"]]
    assert "nurture.flows.tick.nurture_tick" in entrypoints
    for entrypoint in entrypoints:
        module, _, attr = entrypoint.rpartition(".")
        assert module.startswith("nurture.flows."), entrypoint
        assert isinstance(getattr(importlib.import_module(module), attr), Flow), entrypoint
    # The repository's own prefect.yaml deploys the same flows the same way.
    repo = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    assert [d["entrypoint"] for d in repo["deployments"]] == entrypoints
    assert doc["deployments"] == repo["deployments"]


def test_default_folders_resolve_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NURTURE_CAMPAIGNS", raising=False)
    monkeypatch.delenv("NURTURE_TEMPLATES", raising=False)
    init_programme(tmp_path)
    for other in (tmp_path / "campaigns").glob("*.yaml"):
        if other.stem not in ("b2b-inbound-welcome", "scoring", "pipeline"):
            other.unlink()
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.campaigns.resolve() == tmp_path / "campaigns"
    assert settings.templates.resolve() == tmp_path / "templates" / "emails"
    programme = Programme.load(settings.campaigns, settings.templates)
    assert [c.name for c in programme.campaigns] == ["b2b-inbound-welcome"]


def test_the_old_top_level_names_are_not_importable_outside_the_checkout(tmp_path: Path) -> None:
    """The development install maps only ``nurture``, like the wheel."""
    probe = (
        "import importlib.util as u; "
        "print([u.find_spec(n) is not None for n in "
        "('nurture', 'nurture.flows.tick', 'nurture.connectors.hubspot', 'flows', 'connectors')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "[True, True, True, False, False]", out.stderr


OLD_IMPORT = re.compile(r"^\s*(from|import)\s+(flows|connectors)\b", re.M)


def test_no_source_imports_the_old_top_level_names() -> None:
    """After a merge, a module still importing ``flows.x`` would load a second copy."""
    offenders = []
    for folder in ("nurture", "flows", "connectors", "tests", "benchmarks"):
        for path in (PROJECT_ROOT / folder).rglob("*.py"):
            if OLD_IMPORT.search(path.read_text()):
                offenders.append(str(path.relative_to(PROJECT_ROOT)))
    assert offenders == []
