"""The `pymoe` command line."""

import dataclasses

from click.testing import CliRunner
from graphs import layer_graphs
from model_layer_cases import TEST_PRESET

from pymoe.cli import main
from pymoe.config import ACTIVATIONS

# The layers `pymoe check` builds on the test preset (one per activation), compiled with the
# suite's other graphs (tests/graphs.py).
GRAPHS = layer_graphs(dataclasses.replace(TEST_PRESET.config, activation=a) for a in ACTIVATIONS)


def test_check_passes_on_a_preset(basic_preset):
    result = CliRunner().invoke(main, ["check", "--preset", basic_preset, "--tokens", "5"])
    assert result.exit_code == 0, result.output
    assert result.output.count("pass") == len(ACTIVATIONS)


def test_check_rejects_unknown_preset_and_bad_tokens():
    result = CliRunner().invoke(main, ["check", "--preset", "huge"])
    assert result.exit_code == 2 and "unknown preset" in result.output
    result = CliRunner().invoke(main, ["check", "--tokens", "0"])
    assert result.exit_code == 2 and "--tokens must be >= 1" in result.output
