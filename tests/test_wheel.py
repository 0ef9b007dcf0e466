"""A regular (non-editable) install: the wheel carries every shipped study, and an installed mlgate lists
and finds them from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("mlgate", "studies", "setup.py", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the checkout stays free of build/ and egg-info)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    # No build isolation: the test needs no package index, only the setuptools beside pytest.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    [built] = out.glob("mlgate-*.whl")
    return built


def test_the_wheel_carries_every_shipped_study(wheel):
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "studies").rglob("*.yaml")}
    inside = {n.removeprefix("mlgate/") for n in zipfile.ZipFile(wheel).namelist() if n.startswith("mlgate/studies/")}
    assert "studies/paper/gating_table1.yaml" in shipped
    assert inside == shipped
    assert "mlgate/model/weights/mlgate-tiny.pt" in zipfile.ZipFile(wheel).namelist()


def test_an_installed_wheel_lists_and_finds_the_studies_from_another_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # mlgate's dependencies come from this interpreter's site-packages (a path entry runs none of its .pth
    # files, so an editable mlgate there stays invisible); mlgate itself only from the wheel.
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(purelib, "deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def mlgate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "mlgate"), *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True)

    where = subprocess.run([str(python), "-c", "import mlgate; print(mlgate.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv))
    listed = mlgate("list")
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines()}
    assert {"gradient_balancing", "adapt", "paper/gating_table1", "paper/adapt_table2"} <= names
    assert len(names) == len(list((REPO / "studies").rglob("*.yaml")))
    valid = mlgate("validate", "gradient_balancing", "paper/gating_table1")
    assert valid.returncode == 0, valid.stderr
