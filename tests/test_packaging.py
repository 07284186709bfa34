"""The wheel, installed into a fresh virtualenv outside the repository, is a whole plugin.

The wheel is built from a copy of the checkout (so the build leaves nothing behind in
it) and installed with pip, dependencies resolved from the package index as a team's
Prefect environment would. Then, from a temporary directory: only ``nurture`` is
importable, the entry points work (a third-party connector too), and ``nurture init``,
``campaigns validate``, ``templates lint``, a lead import and a ``tick`` run against a
real SMTP sink.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nurture.config import PROJECT_ROOT
from tests.servers import SmtpSink

pytestmark = pytest.mark.slow

KEY = "packaging-test-" + "k" * 40
IGNORE = shutil.ignore_patterns(
    ".venv", ".git", ".nurture", "__pycache__", "*.egg-info", "build", "dist",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
)  # fmt: skip

ACME_MODULE = """
class AcmeConnector:
    name = "acme"
    batch_size = 100

    def push(self, items):
        return []

    def pull(self, since, now):
        return []
"""


def _acme_wheel(folder: Path) -> Path:
    """A third party's connector package, as a wheel (made by hand: no build tools needed)."""
    info = "acme_crm-1.0.dist-info"
    files = {
        "acme_crm.py": ACME_MODULE,
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: acme-crm\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{info}/entry_points.txt": "[nurture.connectors]\nacme = acme_crm:AcmeConnector\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    path = folder / "acme_crm-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in {**files, f"{info}/RECORD": record}.items():
            whl.writestr(name, text)
    return path


@dataclass
class Installed:
    """A fresh virtualenv with the wheel installed, and a scratch folder outside the repo."""

    wheel: Path
    venv: Path
    work: Path
    seconds: dict[str, float]

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment: no NURTURE_ or PREFECT_ settings, no PYTHONPATH."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NURTURE_", "PREFECT_", "PYTHONPATH", "VIRTUAL_ENV"))
        }
        env.update({"PATH": f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", **extra})
        return env

    def run(
        self, *args: str, cwd: Path | None = None, check: bool = True, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run a command of the venv (``nurture``, ``python``, ``pip``) outside the repo."""
        proc = subprocess.run(
            [str(self.venv / "bin" / args[0]), *args[1:]],
            cwd=cwd or self.work,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check:
            assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
        return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Build the wheel and install it into a fresh virtualenv (a few minutes, cold)."""
    root = tmp_path_factory.mktemp("packaging")
    src, dist, venv, work = root / "src", root / "dist", root / "venv", root / "work"
    shutil.copytree(PROJECT_ROOT, src, symlinks=True, ignore=IGNORE)
    work.mkdir()
    seconds = {}
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    seconds["build"] = time.monotonic() - started
    [wheel] = dist.glob("nurture-*.whl")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=1800,
        cwd=work,
    )
    seconds["install"] = time.monotonic() - started
    yield Installed(wheel, venv, work, seconds)


def test_only_nurture_is_a_top_level_name(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = whl.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"nurture", f"{installed.wheel.name.split('-py3')[0]}.dist-info"}
    for expected in (
        "nurture/flows/tick.py",
        "nurture/connectors/hubspot/connector.py",
        "nurture/starter/campaigns/scoring.yaml",
        "nurture/starter/templates/emails/b2b/welcome.html.j2",
        "nurture/starter/prefect.yaml",
        "nurture/migrations/versions/0001_initial_schema.py",
    ):
        assert expected in names, expected
    probe = (
        "import importlib.util as u, importlib.metadata as m, json; "
        "print(json.dumps({"
        "'found': {n: u.find_spec(n) is not None for n in "
        "('nurture', 'nurture.flows.tick', 'nurture.connectors.hubspot', 'flows', 'connectors')},"
        "'tops': sorted({p.parts[0] for p in m.files('nurture') if p.parts[0] != '..'}),"
        "'file': __import__('nurture').__file__}))"
    )
    doc = json.loads(installed.run("python", "-c", probe).stdout)
    assert doc["found"] == {
        "nurture": True,
        "nurture.flows.tick": True,
        "nurture.connectors.hubspot": True,
        "flows": False,
        "connectors": False,
    }
    assert doc["tops"] == ["nurture", "nurture-0.1.0.dist-info"]
    assert str(installed.venv) in doc["file"]  # the installed copy, not the checkout


def test_entry_points_and_a_third_party_connector(installed: Installed) -> None:
    installed.run("pip", "install", "-q", "--no-deps", str(_acme_wheel(installed.work)))
    probe = (
        "from nurture.crm import available_connectors, load_connector; "
        "print(available_connectors()); "
        "print([type(load_connector(n)).__module__ for n in ('local', 'acme')])"
    )
    out = installed.run("python", "-c", probe).stdout.splitlines()
    assert out[0] == "['acme', 'hubspot', 'local', 'pipedrive', 'salesforce', 'webhook']"
    assert out[1] == "['nurture.connectors.local.connector', 'acme_crm']"
    help_text = installed.run("nurture", "--help").stdout
    for command in ("demo", "init", "doctor", "tick"):
        assert f"  {command} " in help_text, command
    # The demo command loads from the nurture.commands entry point.
    assert "--days" in installed.run("nurture", "demo", "--help").stdout


def test_init_validate_lint_and_tick_from_a_scaffolded_programme(
    installed: Installed, smtp_server: SmtpSink
) -> None:
    installed.run("nurture", "init", "acme-programme")
    prog = installed.work / "acme-programme"
    env = {"NURTURE_SECRET_KEY": KEY, "NURTURE_SMTP_URL": smtp_server.url}
    validated = installed.run("nurture", "campaigns", "validate", "campaigns", cwd=prog, **env)
    assert "b2b-inbound-welcome" in validated.stdout
    linted = installed.run("nurture", "templates", "lint", "--json", cwd=prog, **env)
    lint = json.loads(linted.stdout)
    assert lint["errors"] == 0
    assert {"b2b/welcome", "retail/welcome"} <= set(lint["checked"])
    (prog / "leads.csv").write_text(
        "email,first_name,company,type\n"
        "ada@acme.example,Ada,Acme,b2b\n"
        "ben@globex.example,Ben,Globex,b2b\n"
    )
    installed.run("nurture", "leads", "import", "leads.csv", "--source", "website", cwd=prog, **env)
    tick = installed.run(
        "nurture", "tick", "--now", "2026-03-03T10:00:00Z", "--json", cwd=prog, **env
    )
    result = json.loads(tick.stdout)
    assert (result["enrolled"], result["sent"], result["failed"]) == (2, 2, 0)
    smtp_server.wait_for(2)
    assert sorted(smtp_server.recipients()) == ["ada@acme.example", "ben@globex.example"]
    # The default database is relative to the programme, not inside site-packages.
    assert (prog / ".nurture" / "nurture.db").is_file()
    doctor = installed.run("nurture", "doctor", "--json", cwd=prog, check=False, **env)
    checks = {c["name"]: c["status"] for c in json.loads(doctor.stdout)["checks"]}
    assert checks["database"] == checks["smtp"] == checks["campaigns"] == "ok"
    build, install = installed.seconds["build"], installed.seconds["install"]
    print(f"wheel build {build:.0f} s, fresh venv + install {install:.0f} s")
