"""The CLI boundary: `pstar validate` and friends, and one clean line for every user mistake."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pstar_cli.errors import PstarError
from pstar_cli.main import COMMAND_NAMES, app, load_command, report_user_errors

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("validate", "estimate-memory"):
        assert name in result.stdout


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("pstar ")


def test_validate_prints_a_summary():
    result = invoke("validate", "configs/tiny.yaml", "train.steps=7")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("configs/tiny.yaml: valid")
    assert "gpt gpt-mini" in result.stdout and "fp32" in result.stdout and "7 steps" in result.stdout


def test_misspelt_section(tmp_path):
    path = write(tmp_path, "model: {size: gpt-tiny}\ntrian: {steps: 3}\n")
    assert_one_line_error(invoke("validate", path), "trian: unknown section", "did you mean 'train'")


def test_wrong_type():
    assert_one_line_error(invoke("validate", "configs/tiny.yaml", "train.steps=many"),
                          "train.steps: must be an integer (got 'many')")


def test_missing_data_file():
    assert_one_line_error(invoke("validate", "configs/tiny.yaml", "data.path=missing.txt"),
                          "data.path: file not found: missing.txt")


def test_missing_config_file():
    assert_one_line_error(invoke("validate", "no/such.yaml"), "no/such.yaml: config file not found")


def test_several_problems_give_a_header_and_one_line_each():
    result = invoke("validate", "configs/tiny.yaml", "train.steps=0", "data.kind=pictures")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: configs/tiny.yaml has 2 problems:",
        "  data.kind: must be one of synthetic, text, tokens, jsonl (got 'pictures')",
        "  train.steps: must be >= 1 (got 0)",
    ]


def test_estimate_memory_rejects_a_bad_size():
    assert_one_line_error(invoke("estimate-memory", "configs/tiny.yaml", "--gpu-mem", "0"), "--gpu-mem")


def test_user_errors_exit_2_and_bugs_exit_1_with_their_traceback_in_a_file(tmp_path, capsys):
    def bad_input():
        raise PstarError("the data file is empty")

    def bug(output_dir=None):
        raise KeyError("oops")

    with pytest.raises(typer.Exit) as info:
        report_user_errors(bad_input)()
    assert info.value.exit_code == 2
    assert capsys.readouterr().err == "error: the data file is empty\n"
    with pytest.raises(typer.Exit) as info:
        report_user_errors(bug, "train")(output_dir=tmp_path / "run")
    assert info.value.exit_code == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: `pstar train` failed unexpectedly (KeyError: 'oops')")
    [written] = (tmp_path / "run").glob("traceback-train-*.txt")
    assert line.endswith(str(written)) and "KeyError: 'oops'" in written.read_text()


def test_an_unexpected_error_in_a_command_is_one_line_and_a_traceback_file(tmp_path, monkeypatch):
    """A bug inside `pstar validate` (injected): one `error:` line naming the traceback file,
    written under the default output directory, and a non-zero exit code."""
    from pstar_cli.commands import validate

    def broken_summary(cfg):
        raise ZeroDivisionError("injected by the test")

    monkeypatch.setattr(validate, "summary_lines", broken_summary)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["validate", str(REPO / "configs" / "tiny.yaml")])
    assert result.exit_code != 0 and result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: `pstar validate` failed unexpectedly")
    [written] = (tmp_path / "outputs" / "tiny").glob("traceback-validate-*.txt")
    assert str(written.relative_to(tmp_path)) in lines[0]
    assert "ZeroDivisionError: injected by the test" in written.read_text() and "Traceback" not in result.output


def test_an_output_directory_that_is_a_file_is_a_user_mistake(tmp_path):
    not_a_dir = tmp_path / "notes.txt"
    not_a_dir.write_text("x")
    result = invoke("profile", "configs/tiny.yaml", "--output-dir", str(not_a_dir / "profile"))
    assert_one_line_error(result, f"error: not a directory: {not_a_dir / 'profile'}")


def test_every_command_is_registered_from_its_module():
    from pstar_cli.commands import estimate_memory

    assert load_command("estimate-memory") is estimate_memory.command
    result = invoke("--help")
    for name in COMMAND_NAMES:
        assert name in result.stdout


def run_module(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pstar_cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_real_process_reports_a_user_mistake_in_one_line(tmp_path):
    path = write(tmp_path, "model: {size: gpt-tiny}\ntrain: {steps: three}\n")
    proc = run_module("validate", path)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {path}: train.steps: must be an integer (got 'three')\n"
    assert proc.stdout == ""


def test_validates_a_shipped_config():
    """In this process: the real process's output is checked by the test above."""
    result = invoke("validate", str(REPO / "configs" / "gpt-1.3b.yaml"))
    assert result.exit_code == 0, result.output
    assert "1.31 B parameters" in result.stdout and "bf16" in result.stdout
