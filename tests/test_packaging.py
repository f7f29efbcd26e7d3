"""Packaging and set-up: what a fresh machine relies on to run the README's two commands."""

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_distribution_and_console_script():
    project = pyproject()["project"]
    assert project["name"] == "pstar"
    assert project["scripts"] == {"pstar": "pstar_cli.main:main"}
    assert project["requires-python"] == ">=3.10"
    assert "torch>=2.4" in project["dependencies"]
    for name in ("pyyaml", "typer", "rich", "psutil", "nvidia-ml-py"):
        assert name in project["dependencies"]
    assert project["optional-dependencies"]["test"] == ["pytest"]


def test_packages_and_their_data():
    tool = pyproject()["tool"]
    assert tool["setuptools"]["packages"]["find"]["include"] == ["pstar_cli*", "engine*", "models*"]
    assert tool["setuptools"]["package-data"]["pstar_cli"] == ["corpus/*"]
    for package in ("pstar_cli", "engine", "models"):
        assert (REPO / package / "__init__.py").exists()


def test_pytest_skips_slow_and_gpu_tests_by_default():
    options = pyproject()["tool"]["pytest"]["ini_options"]
    assert options["addopts"] == '-m "not slow and not gpu"'
    # engine_on_cpu selects nothing: it pins marked tests' engine to the CPU (tests/conftest.py)
    assert {m.split(":")[0] for m in options["markers"]} == {"slow", "gpu", "engine_on_cpu"}


def make_recipe(target: str) -> str:
    """The recipe lines of one Makefile target."""
    text = (REPO / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)*)", text, re.M)
    assert match, f"no target {target}"
    return match.group(1)


def test_setup_keeps_an_installed_torch_and_never_pulls_an_unpinned_one():
    setup = make_recipe("$(STAMP)")
    assert "-m venv --system-site-packages" in setup
    # torch is installed only when the venv cannot import it, and then the pinned CPU build
    assert re.search(r'-c "import torch" 2>/dev/null \|\| \$\(VPY\) -m pip install "\$\(TORCH_SPEC\)"', setup)
    assert "TORCH_SPEC ?= torch==2.13.0" in (REPO / "Makefile").read_text()
    assert "pip install --no-build-isolation -e '.[test,hf]'" in setup  # the Hugging Face path is tested too
    assert setup.rstrip().endswith("touch $(STAMP)")


def test_make_targets_run_the_demo_and_the_tests():
    assert "pstar train configs/tiny.yaml" in make_recipe("demo")
    assert "-m pytest" in make_recipe("test")
    assert "-m slow" in make_recipe("test-slow") and "-m gpu" in make_recipe("test-gpu")


def test_readme_starts_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    text = ci.read_text()
    commands = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert "set -euo pipefail" in commands
    # the README's test command, then the clean-venv install check beside it
    assert commands[-2:] == ["make test", "make test-install"]
    assert "make test" in (REPO / "README.md").read_text()


def test_clean_install_check_uses_no_system_packages():
    """The install check builds its venv without --system-site-packages, installs pstar from a copy
    (not editable) and runs outside the source tree, so only declared dependencies are importable."""
    script = (REPO / "scripts" / "check_clean_install.sh").read_text()
    assert "-m venv" in script
    assert not any("--system-site-packages" in line for line in script.splitlines() if "venv" in line and "#" not in line)
    assert "pip install -q ." in script and " -e " not in script
    assert "--resume" in script and "checkpoint.interval" in script


@pytest.mark.slow
def test_fresh_clone_sets_itself_up(tmp_path):
    """`make` in a fresh clone builds .venv, installs pstar, and a second run does nothing."""
    clone = tmp_path / "pstar"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    first = subprocess.run(["make", "setup"], cwd=clone, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    version = subprocess.run([str(clone / ".venv" / "bin" / "pstar"), "--version"],
                             capture_output=True, text=True, timeout=120)
    assert version.stdout.startswith("pstar ")
    again = subprocess.run(["make", "setup"], cwd=clone, capture_output=True, text=True, timeout=60)
    assert "pip install" not in again.stdout


def test_readme_python_example_runs():
    """The README's API example, shrunk to gpt-tiny, trains on the CPU."""
    import torch

    readme = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    small = code.replace('"size": "gpt-1.3b", "seq_len": 1024', '"size": "gpt-tiny", "seq_len": 32')
    assert small != code
    batches = [(torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))) for _ in range(2)]
    namespace = {"batches": batches}
    exec(compile(small, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
