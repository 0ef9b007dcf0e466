"""What a user meets at the command line: bad input is one paragraph and exit 2 for every command, and
output into a pipe whose reader has left (`mlgate list | head -1`) ends quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlgate import compare, pipes
from mlgate.cli import main

REPO = Path(__file__).resolve().parent.parent
BAD_CTX = "method.ctx_init=a photo of a"  # 4 words for MaPLe's 2 context tokens: fails only when built

BAD_INPUT = {
    "run unknown key": ["run", "gradient_balancing", "--set", "train.nosuch=1"],
    "run fails when built": ["run", "gradient_balancing", "--set", "method.n_ctx=2"],
    "run device": ["run", "gradient_balancing", "--set", "train.device=gpu"],
    "validate unknown key": ["validate", "gradient_balancing", "--set", "nosuch.key=1"],
    "validate bad value": ["validate", "gradient_balancing", "--set", "train.steps=many"],
    "describe unknown key": ["describe", "maple", "--set", "method.nosuch=1"],
    "describe fails when built": ["describe", "maple", "--set", BAD_CTX],
    "describe classes": ["describe", "coop", "--classes", "0"],
    "bench unknown key": ["bench", "--method", "maple", "--set", "method.nosuch=1"],
    "bench fails when built": ["bench", "--method", "maple", "--set", BAD_CTX],
    "bench device": ["bench", "--device", "nosuch"],
    "eval dataset": ["eval", "--data", "nosuch"],
    "eval shots": ["eval", "--shots", "0"],
    "data summary dataset": ["data", "summary", "--data", "nosuch"],
    "data summary shots": ["data", "summary", "--shots", "0"],
    "list flag": ["list", "--set", "x=1"],
    "schema flag": ["schema", "--set", "x=1"],
}
BAD_COMPARE = {
    "no experiment": ["--experiment", "nosuch"],
    "threshold": ["--experiment", "x", "--gap", "two"],
    "tracking uri": ["--experiment", "x", "--tracking-uri", "nosuch://x"],
}


def _exit_code(entry, argv: list[str]) -> int:
    try:
        return entry(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def _assert_one_paragraph(err: str) -> None:
    assert err.strip(), "a message on stderr"
    assert "Traceback" not in err
    assert "\n\n" not in err.strip()


@pytest.mark.parametrize("argv", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_every_command_answers_bad_input_with_one_paragraph_and_exit_2(workdir, argv, capsys):
    assert _exit_code(main, argv) == 2
    out, err = capsys.readouterr()
    _assert_one_paragraph(err)
    assert not (workdir / "mlflow.db").exists()  # refused before anything is logged


@pytest.mark.parametrize("argv", BAD_COMPARE.values(), ids=BAD_COMPARE.keys())
def test_compare_answers_bad_input_with_one_paragraph_and_exit_2(workdir, argv, capsys):
    assert _exit_code(compare.main, [*argv, "--no-log"]) == 2
    _assert_one_paragraph(capsys.readouterr().err)


def _with_reader_gone(args: list[str], cwd: Path) -> tuple[int, str]:
    # The reader closes the pipe before the command writes a byte: its first write meets a closed pipe.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(), err


@pytest.mark.parametrize("args", [["mlgate", "list"], ["mlgate", "schema"]], ids=["list", "schema"])
def test_output_into_a_closed_pipe_ends_quietly(args, workdir):
    code, err = _with_reader_gone(args, workdir)
    assert (code, err) == (pipes.READER_LEFT, "")


def test_a_shell_pipeline_into_head_shows_the_first_line_and_no_traceback(workdir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", "-c", f"{sys.executable} -m mlgate schema | head -1; "
                           f"{sys.executable} -m mlgate list | head -1"],
                          cwd=workdir, env=env, capture_output=True, text=True)
    assert done.stdout.splitlines()[0] == "{" and done.stdout.splitlines()[1].startswith("adapt ")
    assert done.stderr == ""


def test_compare_into_a_closed_pipe_still_logs_its_report(workdir, write_spec):
    write_spec(study={"n_trials": 1})
    assert main(["run", "tiny"]) == 0
    code, err = _with_reader_gone(["mlgate.compare", "--experiment", "tiny", "--format", "json",
                                   "--output", "report"], workdir)
    assert code == pipes.READER_LEFT and "Traceback" not in err and "report logged to run" in err
    assert (workdir / "report" / "report.json").stat().st_size > 100
