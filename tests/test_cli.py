"""The `pymoe` command line."""

from click.testing import CliRunner

from pymoe.cli import main
from pymoe.config import ACTIVATIONS


def test_check_passes_on_a_preset(basic_preset):
    result = CliRunner().invoke(main, ["check", "--preset", basic_preset, "--tokens", "5"])
    assert result.exit_code == 0, result.output
    assert result.output.count("pass") == len(ACTIVATIONS)


def test_check_rejects_unknown_preset_and_bad_tokens():
    result = CliRunner().invoke(main, ["check", "--preset", "huge"])
    assert result.exit_code == 2 and "unknown preset" in result.output
    result = CliRunner().invoke(main, ["check", "--tokens", "0"])
    assert result.exit_code == 2 and "--tokens must be >= 1" in result.output
