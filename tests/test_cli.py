"""The `rlhf` console script: instant help, every command dispatches, unknown commands suggest."""
import subprocess
import sys
from pathlib import Path

from stages import cli

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command_without_importing_trainers():
    out = subprocess.run([sys.executable, "-c", "import sys; from stages.cli import main; main(['--help']); "
                          "print('trl' in sys.modules, 'torch' in sys.modules)"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert name in out.stdout
    assert out.stdout.strip().endswith("False False")  # lazy: help imports neither trl nor torch


def test_every_command_points_at_a_callable():
    import importlib

    for name, (module, fn, _) in cli.COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), fn)), name


def test_unknown_command_suggests_the_closest(capsys):
    assert cli.main(["stf"]) == 2
    assert "did you mean 'sft'" in capsys.readouterr().err


def test_stage_error_is_one_line_with_exit_code_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "stages.cli", "sft", "--output_dir", str(tmp_path / "o"),
                          "--learnig_rate", "1"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown command-line option '--learnig_rate'")
    assert "Traceback" not in out.stderr
