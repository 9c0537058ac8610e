"""`cxrlite bench`: one group for every benchmark tool; `cxrlite bench BUNDLE` is still the
per-phase latency benchmark; `python -m cxrlite.bench.<module>` runs the same subcommands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cxrlite.bench.server_compare import legacy_argv
from cxrlite.cli import main
from cxrlite.commands.bench import TOOLS


def _run(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="cxrlite")


def test_help_lists_every_tool_with_one_line_each():
    result = _run("bench", "--help")
    assert result.exit_code == 0, result.output
    commands = result.output.split("Commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in commands if line.strip()] == list(TOOLS)
    tools = {"latency", "compare", "mmproj", "soak", "load", "llama", "bandwidth", "vision"}
    assert tools | {"labeler", "dicom", "batching", "llama-server"} == set(TOOLS)


@pytest.mark.parametrize("tool", list(TOOLS))
def test_each_tools_help(tool):
    result = _run("bench", tool, "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cxrlite bench {tool} [OPTIONS]")
    assert "--help" in result.output


@pytest.mark.parametrize(
    "prefix",
    [(), ("latency",), ("--runs", "2")],
    ids=["bundle-first", "latency-subcommand", "options-first"],
)
def test_a_bundle_path_goes_to_the_latency_benchmark(tmp_path, prefix):
    missing = tmp_path / "no-such-bundle"
    result = _run("bench", *prefix, str(missing))
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: {missing}: bundle folder not found\n"
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_options_without_a_bundle_are_the_latency_benchmarks_usage_error():
    result = _run("bench", "--runs", "2")
    assert result.exit_code == 2
    assert "Usage: cxrlite bench latency" in result.output
    assert "give BUNDLE_DIR, or --shape 1b|7b" in result.output


def test_compare_errors_exit_2_in_one_line(tmp_path):
    # Exit code 1 means "cxrlite was worse"; an error that prevents the comparison is 2.
    missing = tmp_path / "no-such-bundle"
    result = _run("bench", "compare", str(missing), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.output == f"Error: {missing}: bundle folder not found\n"


def test_a_bad_concurrency_list_is_a_usage_error(tmp_path):
    result = _run("bench", "load", "--concurrency", "1,x", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "--concurrency" in result.output and "'1,x'" in result.output


def test_the_old_server_compare_mode_option():
    assert legacy_argv(["b", "--concurrency", "1"]) == ("compare", ["b", "--concurrency", "1"])
    assert legacy_argv(["b", "--mode", "soak", "--clients", "2"]) == (
        "soak",
        ["b", "--clients", "2"],
    )
    assert legacy_argv(["--mode=compare", "b"]) == ("compare", ["b"])


def test_python_dash_m_runs_the_same_subcommand():
    command = [sys.executable, "-m", "cxrlite.bench.server_compare", "--mode", "soak", "--help"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Usage: cxrlite bench soak [OPTIONS] BUNDLE")


def test_labeler_speed_prints_and_saves_its_figures(tmp_path):
    source = tmp_path / "reports.txt"
    source.write_text("No pneumothorax. Small left effusion.\nThe lungs are clear.\n")
    result = CliRunner().invoke(
        main, ["bench", "labeler", "--reports", str(source), "--out", str(tmp_path / "l.json")]
    )
    assert result.exit_code == 0, result.output
    assert "2 reports" in result.output and "reports/s unseen" in result.output
    saved = json.loads((tmp_path / "l.json").read_text())
    assert saved["reports"] == 2 and saved["unseen_reports_per_s"] > 0
