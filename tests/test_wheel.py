"""What `pip install flashmoe` gives: a wheel built from this tree without setuptools' warnings, installed into
a fresh virtual environment (the dependencies come from this environment's site-packages, named in a .pth file:
--system-site-packages would give the base interpreter's, which lacks them where the tests run in a virtual
environment, as README's install does), runs `flashmoe generate` on the bundled demo model and serves the web
page's files."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"needs the source tree as a git checkout to copy it ({e})")
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def test_the_wheel_ships_the_demo_model_and_the_page_and_generates_from_a_fresh_venv(tmp_path):
    setuptools = pytest.importorskip("setuptools", reason="the wheel is built with setuptools (the test extra has it)")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} is older than pyproject's build-system needs (>=68)")
    # Build from a copy, so the build's own folders (build/, *.egg-info) never land in the checkout.
    src = tmp_path / "src"
    with tarfile.open(tmp_path / "src.tar", "w") as tar:
        for name in _tracked_files():
            tar.add(ROOT / name, arcname=name)
    with tarfile.open(tmp_path / "src.tar") as tar:
        tar.extractall(src, filter="data")
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                            "print(b.build_wheel(sys.argv[1]))", str(tmp_path / "dist")],
                           cwd=src, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "absent from the `packages` configuration" not in build.stderr, build.stderr[-3000:]
    wheel = tmp_path / "dist" / build.stdout.split()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"flashmoe/data/demo-model/config.json", "flashmoe/serve/static/index.html",
            "flashmoe/serve/static/app.js", "flashmoe/reference/model.py"} <= names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # after the venv's own
    (Path(site) / "dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    where = subprocess.run([python, "-c", "import flashmoe; print(flashmoe.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where  # the wheel's copy, not this checkout's
    run = subprocess.run([venv / "bin" / "flashmoe", "generate", "--backend", "numpy", "-n", "5", "--temperature",
                          "0", "--prompt", "Hello"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Hello") and len(run.stdout.split()) >= 2
