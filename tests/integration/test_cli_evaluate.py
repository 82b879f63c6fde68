"""Bad evaluation options through the CLI: exit 2, one ``error:`` line naming the option, nothing written."""

import pytest
from typer.testing import CliRunner

from anomalygen.cli import app

BAD = [
    (["--epochs", "0"], "--epochs got 0; allowed: an integer >= 1"),
    (["--resolution", "33"], "--resolution got 33; allowed: a multiple of 32"),
    (["--lpips-net", "resnet"], "--lpips-net got 'resnet'; allowed: one of vgg, alex"),
    (["--batch-size", "0"], "--batch-size got 0; allowed: an integer >= 1"),
    (["--batch-size", "-4"], "--batch-size got -4; allowed: an integer >= 1"),
    (["--samples-per-epoch", "0"], "--samples-per-epoch got 0"),
    (["--eval-every", "0"], "--eval-every got 0"),
    (["--cls-epochs", "0"], "--cls-epochs got 0"),
    (["--protocol", "best"], "--protocol got 'best'; allowed: one of paper, clean, both"),
    (["--device", "quantum"], "--device quantum: not a device"),
    (["--metrics", "is,bogus"], "unknown metric(s) bogus"),
    (["--draem-ratio", "1.5"], "--draem-ratio got 1.5; allowed: a number >= 0 and <= 1"),
    (["--draem-test", "train"], "--draem-test got 'train'; allowed: one of clean, full"),
    (["--draem-textures", "/nonexistent/dtd"], "/nonexistent/dtd"),
]


def _one_error_line(result, fragment):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output


@pytest.mark.parametrize("args, fragment", BAD)
def test_evaluate_rejects_bad_options_before_writing(tmp_path, args, fragment):
    (tmp_path / "data").mkdir()
    result = CliRunner().invoke(app, ["evaluate", "--generated", str(tmp_path / "gen"), "--data", str(tmp_path / "data"),
                                      "--report-dir", str(tmp_path / "report"), *args])
    _one_error_line(result, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("args, fragment", [
    *BAD[:3], (["--num-per-type", "0"], "--num-per-type got 0"), (["--methods", "cutpaste,bogus"], "unknown method 'bogus'"),
])
def test_benchmark_rejects_bad_options_before_generating(demo_root, tmp_path, args, fragment):
    result = CliRunner().invoke(app, ["benchmark", "--data", str(demo_root), "--category", "fabric",
                                      "--out", str(tmp_path / "bench"), *args])
    _one_error_line(result, fragment)
    assert not (tmp_path / "bench").exists()
