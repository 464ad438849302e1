"""The configs of ``pb-lightning compare``: checking the user's config and deriving each arm's from it.

The user's YAML is read as plain data and each fit gets its own edited copy (written next to its
logs, so any single fit can be re-run with ``pb-lightning fit --config fits/<fit>/config.yaml``).
Editing the data, rather than appending command-line overrides, is what lets one change a
callback's arguments inside ``trainer.callbacks``, a list that LightningCLI overrides only as a
whole.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pb_lightning.errors import PerforationError, invalid
from pb_lightning.reporting.comparison import REFERENCE, WIDTH_PREFIX

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"

#: The arms ``--arms`` may name (width arms come from ``--widths``).
ARMS = ("dendrites", "plain", "restart", "inert")
DEFAULT_ARMS = ("dendrites", "plain", "restart")
#: ``--quick``: at most this many epochs per fit, and fixed phase lengths (two neuron epochs, one
#: dendrite epoch) so that a smoke test goes through a whole cycle whatever the scores do.
QUICK_EPOCHS = 6
_QUICK_SCHEDULE = {"neuron_epochs": 2, "dendrite_epochs": 1, "max_dendrites": 1, "max_tries": 1, "warmup_epochs": 0}


def fit_name(arm: str, seed: int) -> str:
    """The folder of one fit: ``restart-seed1``, ``plain@32-seed0``."""
    return f"{arm}-seed{seed}"


def resolve_class(class_path: str) -> type | None:
    """Import ``class_path`` (``package.module.Class``); ``None`` if it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    if not module:
        return None
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _is(entry: Any, base: type, name: str) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("class_path"), str):
        return False
    cls = resolve_class(entry["class_path"])
    if cls is None:  # a short name LightningCLI resolves itself
        return entry["class_path"].rpartition(".")[2] == name
    return isinstance(cls, type) and issubclass(cls, base)


def callbacks(config: dict[str, Any]) -> list[Any]:
    """The config's ``trainer.callbacks`` as a list (LightningCLI also accepts a single mapping)."""
    found = (config.get("trainer") or {}).get("callbacks") or []
    return found if isinstance(found, list) else [found]


def perforated_callback(config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``PerforatedCallback`` entry of the config's callbacks, if any."""
    from pb_lightning.lightning.callback import PerforatedCallback

    return next((c for c in callbacks(config) if _is(c, PerforatedCallback, "PerforatedCallback")), None)


def check_base_config(config: Any, path: str) -> None:
    """The user's config must be a dendritic training run: a model and a ``PerforatedCallback``."""
    if not isinstance(config, dict):
        raise invalid("--config", path, "a LightningCLI YAML mapping (trainer:, model:, data:)")
    entry = perforated_callback(config)
    if entry is None:
        raise invalid(
            "--config",
            path,
            "a config whose trainer.callbacks include pb_lightning.PerforatedCallback (compare runs the "
            "dendritic config against its controls)",
        )
    args = entry.get("init_args") or {}
    for name in ("capacity_test", "restarts_only"):
        if args.get(name):
            raise invalid(
                f"PerforatedCallback.{name}", args[name], "false in a config to compare (compare runs the controls)"
            )
    trainer = config.get("trainer") or {}
    if _device_count(trainer.get("devices")) > 1 or (trainer.get("num_nodes") or 1) > 1:
        raise invalid(
            "trainer.devices",
            trainer.get("devices"),
            "1 (and num_nodes 1) for compare: its fits run one after another in one process, which a "
            "multi-process strategy such as DDP would relaunch",
        )
    if not isinstance(config.get("model"), dict) or "class_path" not in config["model"]:
        raise invalid("--config", path, "a config with model.class_path (a pb_lightning.PerforatedModule)")


def _device_count(devices: Any) -> int:
    # "auto" and None count as one: on a multi-GPU machine "auto" would take them all, but the user
    # who wrote it did not ask for several.
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    try:
        count = int(devices)
    except (TypeError, ValueError):
        return 1
    return 2 if count == -1 else count


def check_width_arg(config: dict[str, Any], width_arg: str) -> Any:
    """Check that ``width_arg`` (``model.init_args.hidden``) names an init argument the model takes.

    Returns the config's own value of it (its default when the config leaves it out).
    """
    parts = width_arg.split(".")
    if len(parts) < 3 or parts[0] != "model" or parts[-2] != "init_args":
        raise invalid("--width-arg", width_arg, "a dotted path into the model's init_args, like model.init_args.hidden")
    node: Any = config
    for part in parts[:-2]:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            raise invalid("--width-arg", width_arg, f"a path the config has (no {part!r} in it)")
    if not isinstance(node, dict) or "class_path" not in node:
        raise invalid("--width-arg", width_arg, "a path whose part before init_args has a class_path")
    cls = resolve_class(node["class_path"])
    if cls is None:
        raise invalid("--width-arg", width_arg, f"a path to an importable class (cannot import {node['class_path']})")
    parameters = {n: p for n, p in inspect.signature(cls).parameters.items() if p.kind not in (p.VAR_POSITIONAL,)}
    name = parts[-1]
    if name not in parameters:
        taken = ", ".join(n for n, p in parameters.items() if p.kind != p.VAR_KEYWORD)
        raise invalid("--width-arg", width_arg, f"an init argument {cls.__name__} takes: {taken}")
    own = (node.get("init_args") or {}).get(name, parameters[name].default)
    return None if own is inspect.Parameter.empty else own


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _takes(entry: dict[str, Any], argument: str) -> bool:
    cls = resolve_class(entry.get("class_path", ""))
    return cls is not None and argument in inspect.signature(cls).parameters


def _redirect_loggers(trainer: dict[str, Any], folder: Path) -> None:
    # Loggers given as a class_path write under save_dir: each fit's go into its own folder.
    # (A logger left as true/null already writes under default_root_dir.)
    loggers = trainer.get("logger")
    for entry in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(entry, dict) and _takes(entry, "save_dir"):
            entry.setdefault("init_args", {})["save_dir"] = str(folder)


def arm_config(
    base: dict[str, Any],
    arm: str,
    seed: int,
    folder: Path,
    *,
    quick: bool = False,
    width_arg: str | None = None,
    width: Any = None,
) -> dict[str, Any]:
    """The config of one fit: ``base`` with the arm's callback settings, the seed and the folders.

    ``plain`` and width arms: ``max_dendrites=0`` (the first neuron phase alone, its best weights
    kept); ``restart``: ``restarts_only=True``; ``dendrites`` and ``inert``: as written (the inert
    control is applied to the live model, not through the config: see
    :mod:`pb_lightning.engine.controls`). Every fit logs, checkpoints and writes its
    ``pb_history.json`` under ``folder``; the progress bar and model summary are off (the
    comparison logs its own progress).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    if arm not in ARMS and not arm.startswith(WIDTH_PREFIX):
        raise PerforationError(f"compare: unknown arm {arm!r}")
    config = copy.deepcopy(base)
    config.pop("ckpt_path", None)  # a `fit` key: every comparison fit starts fresh
    config["seed_everything"] = seed
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(folder)
    trainer["enable_progress_bar"] = False
    trainer["enable_model_summary"] = False
    _redirect_loggers(trainer, folder)
    entry = perforated_callback(config)
    assert entry is not None  # check_base_config ran
    args = entry.setdefault("init_args", {})
    if arm == "plain" or arm.startswith(WIDTH_PREFIX):
        args["max_dendrites"] = 0
    elif arm == "restart":
        args["restarts_only"] = True
    if args.get("output_dir"):
        args["output_dir"] = str(folder)
    for other in callbacks(config):
        if _is(other, ModelCheckpoint, "ModelCheckpoint") and (other.get("init_args") or {}).get("dirpath"):
            other["init_args"]["dirpath"] = str(folder / "checkpoints")
    if quick:
        epochs = trainer.get("max_epochs")
        trainer["max_epochs"] = QUICK_EPOCHS if epochs is None or epochs < 0 else min(epochs, QUICK_EPOCHS)
        for name, value in _QUICK_SCHEDULE.items():
            # max_dendrites may only go down: the plain arms' 0 stays 0.
            args[name] = min(args.get(name, value), value) if name == "max_dendrites" else value
        args.pop("dendrite_patience_steps", None)  # not with dendrite_epochs
    if width is not None:
        assert width_arg is not None
        _set(config, width_arg, width)
    return config


@dataclass(frozen=True)
class CompareOptions:
    """What ``pb-lightning compare`` was asked (see ``pb-lightning compare --help``)."""

    config: str
    seeds: int = 3
    arms: tuple[str, ...] = DEFAULT_ARMS
    width_arg: str | None = None
    widths: tuple[Any, ...] = ()
    output: str | None = None
    quick: bool = False
    resume: bool = False
    metric: str | None = None
    metric_mode: str | None = None
    verbose: bool = False

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("pb_compare") / Path(self.config).stem


@dataclass
class Job:
    """One fit: an arm, a seed, and for a width arm the width."""

    arm: str
    seed: int
    width: Any = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)


def plan(options: CompareOptions) -> tuple[dict[str, Any], list[Job]]:
    """Check every argument and build every fit's config, before any fit runs.

    Raises:
        PerforationError: naming the argument, the value and what would be valid.
    """
    if isinstance(options.seeds, bool) or not isinstance(options.seeds, int) or options.seeds < 1:
        raise invalid("--seeds", options.seeds, "an int >= 1 (the number of seeds each arm is fitted with)")
    unknown = [a for a in options.arms if a not in ARMS]
    if unknown:
        raise invalid("--arms", unknown[0], "one of " + ", ".join(repr(a) for a in ARMS))
    if REFERENCE not in options.arms:
        raise invalid("--arms", list(options.arms), f"a list that includes {REFERENCE!r} (every gap is to it)")
    if (options.width_arg is None) != (not options.widths):
        raise invalid(
            "--width-arg/--widths",
            (options.width_arg, list(options.widths)),
            "both given (the init argument that sets the width and the widths to try) or neither",
        )
    if options.metric_mode not in (None, "min", "max"):
        raise invalid("--metric-mode", options.metric_mode, "'min' or 'max'")
    path = Path(options.config)
    if not path.is_file():
        raise invalid("--config", options.config, "a LightningCLI YAML file that exists")
    try:
        base = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise invalid("--config", options.config, f"a valid YAML file ({error})") from error
    check_base_config(base, options.config)
    own_width = check_width_arg(base, options.width_arg) if options.width_arg else None
    widths = []
    for width in options.widths:
        if width == own_width:
            log.info("compare: width %r is the config's own: the `plain` arm covers it", width)
        elif width not in widths:
            widths.append(width)
    jobs = []
    for seed in range(options.seeds):
        for arm in dict.fromkeys(options.arms):  # an arm named twice runs once
            jobs.append(Job(arm, seed))
        jobs.extend(Job(f"{WIDTH_PREFIX}{w}", seed, w) for w in widths)
    out = options.output_dir
    for job in jobs:
        job.config = arm_config(
            base,
            job.arm,
            job.seed,
            out / "fits" / fit_name(job.arm, job.seed),
            quick=options.quick,
            width_arg=options.width_arg,
            width=job.width,
        )
    return base, jobs


def config_hash(base: dict[str, Any], options: CompareOptions) -> str:
    # What makes two result sets comparable: the config and --quick. Not the arms, seeds or widths:
    # a resumed comparison may add any of them (its earlier fits stay valid).
    key = json.dumps([base, options.quick], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_previous(options: CompareOptions, digest: str) -> dict[str, Any] | None:
    path = options.output_dir / RESULTS_FILE
    if not path.exists():
        return None
    previous = json.loads(path.read_text())
    if not options.resume:
        raise invalid(
            "--output",
            str(options.output_dir),
            f"a folder without a previous comparison (it holds {len(previous.get('fits', []))} fits in "
            f"{RESULTS_FILE}); pass --resume to continue it, or name another --output",
        )
    if previous.get("config_hash") != digest:
        raise invalid(
            "--resume",
            str(options.output_dir),
            "a folder whose comparison used the same config and --quick (its results differ: name another --output)",
        )
    earlier = (previous.get("settings") or {}).get("width_arg")
    if earlier and options.width_arg and earlier != options.width_arg:
        raise invalid("--width-arg", options.width_arg, f"{earlier!r}, as in the comparison being resumed")
    return previous
