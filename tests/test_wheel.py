"""The wheel is the product: build it, install it into a clean venv and use it from outside the tree.

The venv sees the system's site-packages (numpy, numba, torch: no downloads) but not the source
checkout, and every command runs from an empty folder, as for a user who ran ``pip install refimpl``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(str(c) for c in cmd)}  -> exit {p.returncode}\n{p.stdout[-1500:]}{p.stderr[-1500:]}")
    return p


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    p = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
        ROOT,
        dict(os.environ),
    )
    assert p.returncode == 0
    if _has("build"):
        assert (
            _run(
                [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(dist), str(ROOT)],
                ROOT,
                dict(os.environ),
            ).returncode
            == 0
        )
    return dist


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_the_wheel_ships_vectors_types_license_and_divergences(built):
    wheel = next(built.glob("refimpl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "refimpl/py.typed" in names
    assert "refimpl/conformance/known_divergences.toml" in names
    assert any(n.startswith("refimpl/golden/v1/") and n.endswith("MANIFEST.json") for n in names)
    n_vectors = sum(n.startswith("refimpl/golden/v1/") and n.endswith(".safetensors") for n in names)
    assert n_vectors > 100, n_vectors
    assert any(re.search(r"\.dist-info/licenses/LICENSE$", n) for n in names), "no LICENSE in the wheel"
    assert not any(n.startswith(("tests/", "spec/", "bench/")) for n in names)


def test_the_sdist_holds_the_sources_and_the_vectors(built):
    sdists = list(built.glob("refimpl-*.tar.gz"))
    if not sdists:
        pytest.skip("the `build` package is not installed: the sdist is not built here")
    import tarfile

    names = tarfile.open(sdists[0]).getnames()
    assert any(n.endswith("refimpl/golden/v1/MANIFEST.json") for n in names)
    assert any(n.endswith("/LICENSE") for n in names)


def test_the_installed_wheel_conforms_verifies_and_runs_the_tour_outside_the_tree(built, tmp_path, capsys):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    wheel = next(built.glob("refimpl-*.whl"))
    # the editable install of the checkout is shadowed by the wheel installed into the venv
    assert (
        _run([str(py), "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)], tmp_path, env).returncode
        == 0
    )
    home = tmp_path / "user"
    home.mkdir()
    where = _run([str(py), "-c", "import refimpl, sys; print(refimpl.__file__)"], home, env)
    assert str(venv) in where.stdout, "the venv imports refimpl from somewhere other than the installed wheel"

    conform = _run([str(venv / "bin" / "refimpl"), "conform"], home, env)
    assert conform.returncode == 0, conform.stdout[-3000:]
    assert "target numba: CONFORMS" in conform.stdout and "gaps (" not in conform.stdout  # golden tier ran
    verify = _run([str(venv / "bin" / "refimpl"), "vectors", "verify"], home, env)
    assert verify.returncode == 0 and "verified" in verify.stdout

    readme = (ROOT / "README.md").read_text()
    tour = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    (home / "tour.py").write_text("\n".join(tour))
    assert _run([str(py), "tour.py"], home, env).returncode == 0

    project = tmp_path / "empty_project"
    project.mkdir()
    (project / "test_nothing.py").write_text(
        textwrap.dedent("""
        def test_the_project_own_code_still_runs():
            import numpy
            assert numpy.add(2, 3) == 5
    """)
    )
    plugin = _run(
        [
            str(py),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--refimpl-target=numba",
            "--refimpl-ops=lora.forward,quant.quantize_4bit",
        ],
        project,
        env,
    )
    assert plugin.returncode == 0, plugin.stdout[-3000:]
    assert "refimpl conformance: numba" in plugin.stdout
    with capsys.disabled():  # the wheel job's evidence belongs in the CI log
        verdict = next(line for line in conform.stdout.splitlines() if line.startswith("target numba:"))
        print(
            f"\nwheel {wheel.name} in a clean venv, run from {home}:\n  refimpl conform -> {verdict}\n"
            f"  refimpl vectors verify -> {verify.stdout.strip()}\n  README tour -> exit 0\n"
            f"  pytest --refimpl-target=numba (empty project) -> {plugin.stdout.strip().splitlines()[-1]}"
        )
