"""Release packaging: the version is defined once, ``python -m build`` makes an sdist and a wheel
with the license and ``py.typed``, and the wheel, installed into a fresh virtual environment,
runs the main job (``python -m fa_jax run mnist --seeds 1 --steps 100``).

The fresh environment gets the wheel alone (``--no-deps``); its dependencies are the ones
already installed here, put on its path by a ``.pth`` file, so the test downloads nothing. That
they satisfy the wheel's declared requirements is checked from the wheel's own metadata. Set
``FA_JAX_WHEEL_FULL_INSTALL=1`` to let pip install the dependencies into the fresh environment
instead (from the package index: slower).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile

import pytest

import fa_jax

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What a build must not pick up from a working tree (a fresh clone has none of it).
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    "_build",
    "results",
    ".ipynb_checkpoints",
    ".mypy_cache",
    ".ruff_cache",
)
PACKAGES = ["fa_jax", "fa_jax/_engine", "fa_jax/rules", "fa_jax/experiments"]


def test_the_version_is_defined_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fa_jax.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+)?", fa_jax.__version__)
    others = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "fa_jax").rglob("*.py")
        if path.name != "__init__.py" or path.parent.name != "fa_jax"
        if re.search(r"^__version__\s*=", path.read_text(), flags=re.M)
    ]
    assert not others, f"__version__ assigned outside fa_jax/__init__.py: {others}"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{fa_jax.__version__}]" in changelog, "CHANGELOG.md has no section for this version"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    pytest.importorskip("build", reason="the test extra: pip install -e '.[test]'")
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE, symlinks=True)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"python -m build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    print(f"python -m build: {time.perf_counter() - start:.1f} s")
    (wheel,) = (work / "dist").glob("*.whl")
    (sdist,) = (work / "dist").glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist, "work": work}


def test_the_wheel_holds_the_package_its_license_and_py_typed(dist: dict[str, pathlib.Path]) -> None:
    version = fa_jax.__version__
    assert dist["wheel"].name == f"fa_jax-{version}-py3-none-any.whl"
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"fa_jax-{version}.dist-info/METADATA").decode()
        entry_points = wheel.read(f"fa_jax-{version}.dist-info/entry_points.txt").decode()
    assert "fa_jax/py.typed" in names
    assert f"fa_jax-{version}.dist-info/licenses/LICENSE" in names
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel"
    assert not [n for n in names if n.startswith(("tests/", "docs/", "benchmarks/", "notebooks/"))]
    assert f"Version: {version}\n" in metadata
    assert "License-Expression: Apache-2.0\n" in metadata
    assert "Requires-Python: >=3.10\n" in metadata
    for extra in ("experiments", "test", "docs", "lint"):
        assert f"Provides-Extra: {extra}\n" in metadata
    assert "fa-jax = fa_jax.experiments.cli:main" in entry_points


def test_the_sdist_holds_what_builds_the_wheel(dist: dict[str, pathlib.Path]) -> None:
    version = fa_jax.__version__
    with tarfile.open(dist["sdist"]) as sdist:
        names = set(sdist.getnames())
    top = f"fa_jax-{version}"
    for name in ("pyproject.toml", "README.md", "LICENSE", "PKG-INFO", "fa_jax/py.typed", "fa_jax/__init__.py"):
        assert f"{top}/{name}" in names, f"{name} is missing from the sdist"


def _fresh_venv(path: pathlib.Path, wheel: pathlib.Path, *, full: bool) -> pathlib.Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-input"]
    if full:
        subprocess.run([*install, f"{wheel}[experiments]"], check=True, timeout=1800)
        return python
    subprocess.run([*install, "--no-deps", str(wheel)], check=True, timeout=300)
    # Reuse what is installed here: the environment's own site-packages come first, so the
    # wheel's fa_jax is imported, never the checkout's.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    here = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (pathlib.Path(purelib) / "_fa_jax_test_dependencies.pth").write_text("\n".join(here) + "\n")
    return python


# Checks, inside the fresh environment, that the installed wheel's requirements (with the
# experiments extra) are met, and where fa_jax is imported from.
CHECK_REQUIREMENTS = """
import importlib.metadata as md, json
from packaging.requirements import Requirement
import fa_jax
unmet = []
for text in md.requires("fa_jax") or []:
    req = Requirement(text)
    if req.marker and not req.marker.evaluate({"extra": "experiments"}):
        continue
    if req.name.replace("-", "_").lower() == "fa_jax":
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        unmet.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(version, prereleases=True):
        unmet.append(f"{req} (found {version})")
print(json.dumps({"file": fa_jax.__file__, "version": fa_jax.__version__, "unmet": unmet}))
"""


def test_the_wheel_in_a_fresh_venv_runs_the_main_job(dist: dict[str, pathlib.Path]) -> None:
    full = os.environ.get("FA_JAX_WHEEL_FULL_INSTALL") == "1"
    venv = dist["work"] / "venv"
    start = time.perf_counter()
    python = _fresh_venv(venv, dist["wheel"], full=full)
    installed = time.perf_counter() - start
    run = dist["work"] / "run"
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}

    check = subprocess.run(
        [str(python), "-c", CHECK_REQUIREMENTS], cwd=run, env=env, capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stderr[-3000:]
    found = json.loads(check.stdout.strip().splitlines()[-1])
    assert pathlib.Path(found["file"]).is_relative_to(venv), f"fa_jax imported from {found['file']}, not the wheel"
    assert found["version"] == fa_jax.__version__
    assert not found["unmet"], f"the wheel's requirements are not met: {found['unmet']}"

    start = time.perf_counter()
    job = subprocess.run(
        [str(python), "-m", "fa_jax", "run", "mnist", "--seeds", "1", "--steps", "100"],
        cwd=run,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - start
    assert job.returncode == 0, f"the main job failed:\n{job.stdout[-3000:]}\n{job.stderr[-3000:]}"
    print(f"fresh venv: {installed:.1f} s; main job at 100 steps: {seconds:.1f} s")
    results = json.loads((run / "results" / "mnist" / "results.json").read_text())
    text = json.dumps(results)
    for rule in ("bp", "fa", "dfa", "shallow"):
        assert f'"{rule}"' in text and rule in job.stdout, f"rule {rule} is missing from the run"
