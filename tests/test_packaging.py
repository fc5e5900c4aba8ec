"""The built wheel ships passes/ as lars_fx.passes, never as a top-level `passes` module."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
         str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("lars_fx-*.whl")
    return built


def test_wheel_maps_passes_into_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lars_fx/passes/__init__.py" in names
    assert not [n for n in names if n.startswith("passes/")]
    top_level = {n.split("/")[0] for n in names if not n.startswith("lars_fx-")}
    assert top_level == {"lars_fx"}


def test_wheel_declares_backend_and_console_script(wheel):
    archive = zipfile.ZipFile(wheel)
    (entry_points,) = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
    text = archive.read(entry_points).decode()
    assert "[torch_dynamo_backends]" in text and "lars_fx = lars_fx.backend:lars_fx_backend" in text
    assert "lars-fx = lars_fx.cli:main" in text


def test_installed_wheel_imports_lars_fx_passes_but_not_passes(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import importlib.util, lars_fx, lars_fx.passes;"
        f"assert lars_fx.__file__.startswith({str(target)!r}), lars_fx.__file__;"
        "assert lars_fx.passes.__file__.startswith(lars_fx.__file__.rsplit('/', 1)[0]);"
        "assert importlib.util.find_spec('passes') is None;"
        "print(lars_fx.passes.__name__)"
    )
    # -S keeps the editable install of the checkout off sys.path; torch comes from PYTHONPATH.
    import torch

    site_packages = str(Path(torch.__file__).parents[1])
    result = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{target}:{site_packages}"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lars_fx.passes"
