"""``pb-lightning compare`` end to end on a tiny user project, and its argument errors.

The gaps and the verdict are recomputed here by hand from the per-fit rows of the
``results.json`` the command saved, not from its own statistics module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from pb_lightning.errors import PerforationError
from pb_lightning.lightning.compare import CompareOptions, compare, compare_command

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

_FIXTURES = "tests.lightning.compare_fixtures"


def _config(tmp_path: Path, *, data: str = "TinyData", perforated: bool = True) -> Path:
    callbacks: list[dict[str, Any]] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "elsewhere" / "ckpt"), "monitor": "val_loss", "save_last": True},
        },
        {
            "class_path": "lightning.pytorch.callbacks.EarlyStopping",
            "init_args": {"monitor": "val_loss", "patience": 9},
        },
    ]
    if perforated:
        callbacks.insert(0, {"class_path": "pb_lightning.PerforatedCallback", "init_args": {"monitor": "val_loss"}})
    config = {
        "seed_everything": 123,
        "trainer": {
            "max_epochs": 40,
            "accelerator": "cpu",
            "devices": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "elsewhere" / "logs")},
            },
            "callbacks": callbacks,
        },
        "model": {"class_path": f"{_FIXTURES}.TinyMLP", "init_args": {"width": 3}},
        "data": {"class_path": f"{_FIXTURES}.{data}"},
    }
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _by_hand(fits: list[dict[str, Any]], arm: str, better: str, envelope: bool = False) -> tuple[float, float]:
    """Mean and standard error of the per-seed gaps dendrites − arm (sign: positive is better)."""
    sign = 1.0 if better == "max" else -1.0
    ref = {f["seed"]: f for f in fits if f["arm"] == "dendrites"}
    gaps = []
    for seed, d in ref.items():
        if envelope:
            plain = [
                f["score"]
                for f in fits
                if f["seed"] == seed and (f["arm"] == "plain" or f["arm"].startswith("plain@"))
                if f["params"] <= d["params"]
            ]
            other = max(plain) if better == "max" else min(plain)
        else:
            other = next(f["score"] for f in fits if f["arm"] == arm and f["seed"] == seed)
        gaps.append(sign * (d["score"] - other))
    mean = sum(gaps) / len(gaps)
    se = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)) / math.sqrt(len(gaps))
    return mean, se


@pytest.mark.slow  # nine fits end to end: among the longest tests (--durations)
def test_quick_compare_end_to_end_with_test_split_widths_and_callbacks(
    tmp_path: Path, capsys: Any, caplog: Any
) -> None:
    out = tmp_path / "out"
    argv = ["--config", str(_config(tmp_path)), "--seeds", "2", "--quick", "--output", str(out)]
    argv += ["--arms", "dendrites", "plain", "restart", "inert", "--width-arg", "model.init_args.width"]
    argv += ["--widths", "3", "12"]
    with caplog.at_level("INFO"):
        compare_command(argv)
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    fits = results["fits"]

    # Every fit ran, in its own folder, with its own logs and checkpoints (nothing where the config said).
    assert sorted((f["arm"], f["seed"]) for f in fits) == sorted(
        (a, s) for a in ("dendrites", "plain", "restart", "inert", "plain@12") for s in (0, 1)
    )
    assert not (tmp_path / "elsewhere").exists()
    for fit in fits:
        folder = Path(fit["folder"])
        assert (folder / "config.yaml").exists()
        assert (folder / "checkpoints" / "last.ckpt").exists()
        assert set(fit["test"]) == {"test_acc"}
        assert fit["score"] == fit["test"]["test_acc"]
    assert results["source"] == "test"
    assert results["metric"] == "test_acc"
    assert results["mode"] == "max"
    # The same seed: the same initial weights, so the plain arm and the dendritic arm share the first phase.
    params = {f["arm"]: f["params"] for f in fits}
    assert params["plain"] == params["restart"] < params["plain@12"]
    assert "fit 10/10 (plain@12, seed 1)" in caplog.text
    assert caplog.text.count("INERT CONTROL enabled") == 2  # the inert arm's two fits, and only those
    # Seeded alike, every arm at the config's width starts from the same weights and batches: the
    # first neuron phase (two validations under --quick) is the same run in each; another seed is not.
    first_phase = {
        (arm, seed): [row["score"] for row in json.loads(_history(out, arm, seed).read_text())[:2]]
        for arm in ("dendrites", "plain", "restart", "inert")
        for seed in (0, 1)
    }
    for seed in (0, 1):
        assert len({tuple(v) for (_, s), v in first_phase.items() if s == seed}) == 1, first_phase
    assert first_phase["plain", 0] != first_phase["plain", 1]

    # The gaps and the envelope, by hand from the saved fits.
    for arm in ("plain", "restart", "inert", "plain@12"):
        mean, se = _by_hand(fits, arm, "max")
        assert results["gaps"][arm]["mean"] == pytest.approx(mean)
        assert results["gaps"][arm]["se"] == pytest.approx(se)
        assert results["gaps"][arm]["resolved"] == (abs(mean) > 2 * se)
    env_mean, env_se = _by_hand(fits, "", "max", envelope=True)
    assert results["envelope"]["mean"] == pytest.approx(env_mean)
    assert results["envelope"]["se"] == pytest.approx(env_se)

    # The verdict leads with the restart control, in points, and says whether the seeds resolve it.
    mean, se = _by_hand(fits, "restart", "max")
    numbers = f"{mean * 100:+.1f} ± {se * 100:.1f} points over 2 seeds"
    verdict = results["verdict"]
    if abs(mean) > 2 * se:
        assert verdict.startswith(f"dendrites {'beat' if mean > 0 else 'trail'} restart by {numbers}")
    else:
        assert verdict.startswith(f"dendrites vs restart: {numbers}: no difference the seeds can resolve")
    assert f"Verdict: {verdict}" in printed
    assert "| plain@12 | 2 |" in printed
    assert (out / "results.md").read_text() in printed
    assert (out / "results.png").stat().st_size > 0

    # --resume skips every fit already there; without it the folder is refused.
    before = (out / "results.json").read_text()
    options = CompareOptions(
        config=argv[1], seeds=2, arms=("dendrites", "plain", "restart", "inert"), output=str(out), quick=True
    )
    options = CompareOptions(**{**options.__dict__, "width_arg": "model.init_args.width", "widths": (3, 12)})
    with pytest.raises(PerforationError, match="`--output` must be a folder without a previous comparison"):
        compare(options)
    again = compare(CompareOptions(**{**options.__dict__, "resume": True}))
    assert [f["wall_s"] for f in again["fits"]] == [f["wall_s"] for f in json.loads(before)["fits"]]


def test_without_a_test_split_the_best_validation_score_is_compared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    # ... and without matplotlib: said once in the log, no plot.
    monkeypatch.setattr("pb_lightning.lightning.compare.matplotlib_available", lambda: False)
    out = tmp_path / "out"
    options = CompareOptions(
        config=str(_config(tmp_path, data="TinyDataNoTest")), seeds=2, arms=("dendrites", "plain"), output=str(out)
    )
    first = compare(CompareOptions(**{**options.__dict__, "quick": True, "seeds": 1}))
    assert first["verdict"] == (
        f"dendrites vs plain: {first['gaps']['plain']['mean']:+.4f} (one seed, no error bar) over 1 seed: "
        "one seed cannot resolve any difference"
    )
    # --resume adds the second seed's fits and keeps the first seed's.
    with caplog.at_level("INFO"):
        results = compare(CompareOptions(**{**options.__dict__, "quick": True, "resume": True}))
    assert caplog.text.count("matplotlib is not installed: no results.png") == 1
    assert not (out / "results.png").exists()
    assert results["fits"][:2] == first["fits"]
    assert [(f["arm"], f["seed"]) for f in results["fits"][2:]] == [("dendrites", 1), ("plain", 1)]
    assert results["source"] == "validation"
    assert results["metric"] == "val_loss"
    assert results["mode"] == "min"
    assert all(f["score"] == f["best_validation"] and f["test"] == {} for f in results["fits"])
    mean, se = _by_hand(results["fits"], "plain", "min")
    assert results["gaps"]["plain"]["mean"] == pytest.approx(mean)
    assert results["gaps"]["plain"]["se"] == pytest.approx(se)
    assert results["envelope"] is None
    assert (
        "best val_loss on the validation split (the data module has no test split)" in (out / "results.md").read_text()
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"arms": ("dendrites", "bogus")},
            "`--arms` must be one of 'dendrites', 'plain', 'restart', 'inert'; got 'bogus'",
        ),
        ({"arms": ("plain", "restart")}, "`--arms` must be a list that includes 'dendrites'"),
        ({"seeds": 0}, "`--seeds` must be an int >= 1"),
        (
            {"width_arg": "model.init_args.hidden", "widths": (8,)},
            "`--width-arg` must be an init argument TinyMLP takes: width, lr; got 'model.init_args.hidden'",
        ),
        ({"width_arg": "model.init_args.width"}, "`--width-arg/--widths` must be both given"),
        ({"devices": 2}, "`trainer.devices` must be 1 (and num_nodes 1) for compare"),
        ({"width_arg": "model.init_args.width", "widths": ("wide",)}, "the 'plain@wide' arm's config does not parse"),
        (
            {"perforated": False},
            "`--config` must be a config whose trainer.callbacks include pb_lightning.PerforatedCallback",
        ),
    ],
)
def test_bad_arguments_fail_before_any_fit(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    change = dict(change)
    config = _config(tmp_path, perforated=change.pop("perforated", True))
    if "devices" in change:
        data = yaml.safe_load(config.read_text())
        data["trainer"]["devices"] = change.pop("devices")
        config.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    with pytest.raises(PerforationError, match=_escape(message)):
        compare(CompareOptions(config=str(config), output=str(out), **change))
    assert not out.exists()


def test_the_command_reports_a_bad_argument_and_exits_2(tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        compare_command(["--config", str(_config(tmp_path)), "--seeds", "0", "--output", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert (
        "`--seeds` must be an int >= 1 (the number of seeds each arm is fitted with); got 0" in capsys.readouterr().err
    )


def _history(out: Path, arm: str, seed: int) -> Path:
    (path,) = (out / "fits" / f"{arm}-seed{seed}").rglob("pb_history.json")
    return path


def _escape(text: str) -> str:
    import re

    return re.escape(text)
