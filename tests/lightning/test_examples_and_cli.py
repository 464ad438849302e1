"""The shipped configs and example scripts run (shortened) and do what they say."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pb_lightning.lightning.cli import main
from tests.helpers import run_command

_REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.slow  # a CLI run
def test_the_capacity_test_config_runs_through_the_cli(tmp_path: Path, caplog: Any) -> None:
    config = _REPO / "configs" / "digits_capacity_test.yaml"
    with caplog.at_level("INFO"):
        cli = main(
            [
                "fit",
                "--config",
                str(config),
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
    assert [layer.num_dendrites for layer in cli.model.perforated_layers()] == [3, 3, 3]
    assert "3 dendrite sets added; no problems detected" in caplog.text


def test_the_main_job_config_parses_into_the_documented_objects(tmp_path: Path) -> None:
    config = _REPO / "configs" / "digits.yaml"
    data = yaml.safe_load(config.read_text())
    callback = data["trainer"]["callbacks"][0]
    assert callback["class_path"] == "pb_lightning.PerforatedCallback"
    # A short run of the real config (4 epochs): model, data, callback, TensorBoard logger.
    cli = main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_epochs",
            "4",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    assert cli.trainer.current_epoch == 4
    assert cli.model.dendrite_config.num_candidates == 4
    assert any((tmp_path / "digits").rglob("events.out.tfevents.*"))


@pytest.mark.slow  # a CLI run
def test_python_dash_m_runs_the_same_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        sys, "argv", ["pb_lightning", "fit", "--print_config", "--config", str(_REPO / "configs" / "digits.yaml")]
    )
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("pb_lightning", run_name="__main__")
    assert exit_info.value.code == 0


@pytest.mark.slow  # example scripts
@pytest.mark.parametrize("script", ["digits_mlp.py", "digits_conv.py"])
def test_example_scripts_run(script: str, tmp_path: Path) -> None:
    namespace = runpy.run_path(str(_REPO / "examples" / script))
    result = namespace["main"](["--max-epochs", "3", "--root", str(tmp_path)])
    # Ten balanced classes: chance is 0.1. Three epochs reach 0.52 (MLP) and 0.69 (conv), seeded;
    # a run that does not learn (or tests an untrained model) stays near 0.1.
    assert result["test_acc"] > 0.3


@pytest.mark.slow  # an example script
def test_the_regression_example_runs_with_its_sparse_trained_dendrites(tmp_path: Path) -> None:
    namespace = runpy.run_path(str(_REPO / "examples" / "friedman_regression.py"))
    assert namespace["Regressor"]().dendrite_config == namespace["DENDRITES"]
    result = namespace["main"](["--max-epochs", "40", "--root", str(tmp_path)])
    # R² of a model that predicts the mean is 0; 40 epochs of the 10-4-4-1 MLP reach about 0.85.
    assert result["test_r2"] > 0.6
    assert result["dendrites"] >= 0


@pytest.mark.slow  # the installed command, in a subprocess
def test_the_console_command_starts_without_lightnings_args_warning(tmp_path: Path) -> None:
    # The installed entry point, run as a user runs it: `pb-lightning --help`.
    command = Path(sys.executable).with_name("pb-lightning")
    launcher = [str(command)] if command.exists() else [sys.executable, "-m", "pb_lightning"]
    result = run_command([*launcher, "--help"], timeout=300, cwd=tmp_path)
    assert "usage:" in result.stdout
    assert "args parameter is intended" not in result.stderr + result.stdout


def test_console_passes_explicit_arguments_through(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from pb_lightning import cli as cli_module

    seen: list[Any] = []
    monkeypatch.setattr(cli_module, "main", lambda args=None: seen.append(args))
    monkeypatch.setattr(sys, "argv", ["pb-lightning", "fit", "--config", "x.yaml"])
    cli_module.console()  # from the command line: LightningCLI reads sys.argv itself
    cli_module.console(["fit", "--config", "y.yaml"])  # from Python: the arguments given
    assert seen == [None, ["fit", "--config", "y.yaml"]]


@pytest.mark.slow  # an example script
@pytest.mark.parametrize("load", ["checkpoint", "state_dict"])
def test_the_finetune_example_adds_dendrites_to_a_saved_plain_network(load: str, tmp_path: Path) -> None:
    namespace = runpy.run_path(str(_REPO / "examples" / "finetune_trained.py"))
    result = namespace["main"](["--plain-epochs", "8", "--max-epochs", "10", "--load", load, "--root", str(tmp_path)])
    assert (tmp_path / "plain.ckpt").exists()
    assert (tmp_path / "plain.pt").exists()
    # Loaded into the PerforatedModule, the saved network scores exactly what it scored before.
    assert result["loaded_test_acc"] == result["plain_test_acc"]
    assert result["plain_test_acc"] > 0.5  # eight epochs of the 64-8-8-10 MLP: about 0.8, seeded
    assert result["test_acc"] > 0.5
    assert result["parameters"] >= result["plain_parameters"]
