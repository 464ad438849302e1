"""PerforatedModule: the LightningModule side of pb_lightning.

Subclass it instead of ``LightningModule``. It perforates your network in ``configure_model``
(after your ``__init__`` built it, before optimizers exist), owns the structural changes of the
cycle — :meth:`~PerforatedModule.start_dendrite_phase`, :meth:`~PerforatedModule.accept_dendrites`,
:meth:`~PerforatedModule.discard_candidates`, through which
:class:`~pb_lightning.lightning.callback.PerforatedCallback` makes every restructure its
:class:`~pb_lightning.cycle.driver.CycleDriver` decides (override them to act around each) — and
makes every checkpoint
self-describing: a checkpoint taken at any point of the cycle — mid-dendrite-phase included —
loads with ``Model.load_from_checkpoint(path)`` and resumes with ``trainer.fit(ckpt_path=...)``.

A trained network without dendrites goes in the same ways: its plain state dict loads before or
after perforation (the layers map ``net.0.weight`` onto ``net.0.module.weight``), and a plain
Lightning checkpoint loads with ``load_from_checkpoint``, ready to be fine-tuned with dendrites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from pb_lightning.cycle.checkpoint_format import CHECKPOINT_VERSION, check_checkpoint_version
from pb_lightning.engine import params as _params
from pb_lightning.engine import state as _state
from pb_lightning.engine import transitions as _transitions
from pb_lightning.engine.config import DendriteConfig
from pb_lightning.engine.convert import perforate, perforated_layers
from pb_lightning.engine.layer import PerforatedLayer
from pb_lightning.engine.selectors import type_selector
from pb_lightning.errors import PerforationError, invalid

_CHECKPOINT_KEY = "pb_lightning"

__all__ = ["CHECKPOINT_VERSION", "PerforatedModule", "as_restructurer", "check_checkpoint_version"]


class PerforatedModule(pl.LightningModule):
    """A ``LightningModule`` whose network's neurons can grow dendrites.

    Build your network in ``__init__`` as usual and call ``super().__init__(...)`` with the
    perforation options. In ``configure_optimizers``, optimise ``self.parameters()`` (frozen
    parameters get no gradient, so the optimizer skips them), the trainable ones, or
    :meth:`dendrite_parameter_groups` — the callback re-runs it after every restructure and checks
    that every trainable parameter is in the new optimizer.

    Args:
        dendrite_config: how dendrites are built and trained (default :class:`DendriteConfig()`).
        perforate_include: which modules to perforate: qualified-name globs (``"net.*"``),
            module types, or types written ``"type:torch.nn.Linear"``; default every
            ``nn.Linear`` and ``nn.Conv1d/2d/3d``. Types kept by ``save_hyperparameters()`` are
            written into checkpoints in the string form, which ``load_from_checkpoint`` (with
            ``weights_only=True``) can read and this argument resolves back.
        perforate_exclude: modules never to perforate, in the same forms.
        with_norm: wrap a module together with the normalisation layer it feeds, so that
            dendrites are added after the norm: ``True`` pairs each module with the norm that
            directly follows it (see :func:`~pb_lightning.perforate`), a mapping
            ``{"conv1": "bn1"}`` names the pairs by qualified name.
        perforate_neuron_axes: for included modules other than Linear, Conv and recurrent
            layers, the axis of their output that indexes neurons (see :func:`~pb_lightning.perforate`).
        perforate_output_selectors: for included modules with tuple outputs, which entry holds
            the neurons (recurrent layers default to ``0``, their per-step output).

    Example::

        >>> import torch
        >>> class Net(PerforatedModule):
        ...     def __init__(self) -> None:
        ...         super().__init__(perforate_exclude=["head"])
        ...         self.body = torch.nn.Linear(4, 8)
        ...         self.head = torch.nn.Linear(8, 2)
        >>> net = Net()
        >>> net.configure_model()
        >>> [layer.name for layer in net.perforated_layers()]
        ['body']
    """

    def __init__(
        self,
        *,
        dendrite_config: DendriteConfig | None = None,
        perforate_include: Sequence[str | type[nn.Module]] | None = None,
        perforate_exclude: Sequence[str | type[nn.Module]] | None = None,
        with_norm: bool | Mapping[str, str] = False,
        perforate_neuron_axes: Mapping[type[nn.Module] | str, int] | None = None,
        perforate_output_selectors: Mapping[type[nn.Module] | str, int | str] | None = None,
    ) -> None:
        super().__init__()
        config = DendriteConfig() if dendrite_config is None else dendrite_config
        if not isinstance(config, DendriteConfig):
            raise invalid("dendrite_config", dendrite_config, "a pb_lightning.DendriteConfig")
        for name, value in (("perforate_include", perforate_include), ("perforate_exclude", perforate_exclude)):
            if value is not None and (isinstance(value, str) or not isinstance(value, Sequence)):
                raise invalid(name, value, "a list of qualified-name globs or module types")
        if isinstance(with_norm, Mapping):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in with_norm.items()):
                raise invalid("with_norm", with_norm, "a bool or a mapping {module name: norm name} of strings")
            with_norm = dict(with_norm)
        elif not isinstance(with_norm, bool):
            raise invalid("with_norm", with_norm, "a bool or a mapping {module name: norm name}")
        for name, mapping in (
            ("perforate_neuron_axes", perforate_neuron_axes),
            ("perforate_output_selectors", perforate_output_selectors),
        ):
            if mapping is not None and not isinstance(mapping, Mapping):
                raise invalid(name, mapping, "a mapping {module type or name glob: value}")
        self._perforate_neuron_axes = None if perforate_neuron_axes is None else dict(perforate_neuron_axes)
        self._perforate_output_selectors = (
            None if perforate_output_selectors is None else dict(perforate_output_selectors)
        )
        self.dendrite_config = config
        self._perforate_include = None if perforate_include is None else list(perforate_include)
        self._perforate_exclude = None if perforate_exclude is None else list(perforate_exclude)
        self._with_norm = with_norm
        self._pending_perforation_state: dict[str, Any] | None = None
        self.register_load_state_dict_post_hook(_apply_pending_perforation_state)

    # ------------------------------------------------------------------ conversion
    def perforation_target(self) -> nn.Module:
        """The module to perforate. Override to restrict it to a submodule (e.g. ``self.net``)."""
        return self

    def configure_model(self) -> None:
        """Perforate the network (once). Call ``super().configure_model()`` if you override it."""
        if not perforated_layers(self):
            perforate(
                self.perforation_target(),
                include=self._perforate_include,
                exclude=self._perforate_exclude,
                config=self.dendrite_config,
                with_norm=self._with_norm,
                neuron_axes=self._perforate_neuron_axes,
                output_selectors=self._perforate_output_selectors,
            )

    def perforated_layers(self) -> list[PerforatedLayer]:
        """The perforated layers of this module, in a stable order."""
        return perforated_layers(self)

    # ------------------------------------------------------------------ phase controls
    # The callback's driver restructures through these three (the module is its Restructurer):
    # an override that calls super() sees, and may act around, every restructure of a fit.
    def start_dendrite_phase(self) -> None:
        """Add candidates to every perforated layer and freeze the network (the cycle calls it
        at the start of each dendrite phase, and of each retry)."""
        _transitions.start_dendrite_phase(self)

    def accept_dendrites(self) -> dict[str, Tensor]:
        """Install every neuron's best candidate and return to the neuron phase (the cycle calls
        it when a dendrite phase ends)."""
        return _transitions.accept_dendrites(self)

    def discard_candidates(self) -> None:
        """Drop the candidates and return to the neuron phase (the cycle calls it before
        restoring weights saved without them: a rejected cycle, the end of training)."""
        _transitions.discard_candidates(self)

    @property
    def in_dendrite_phase(self) -> bool:
        """Whether the perforated layers currently hold candidates."""
        return _transitions.in_dendrite_phase(self)

    def dendrite_parameter_groups(self, *, weight_decay: float = 0.0, candidate_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups for the current phase (see :func:`pb_lightning.parameter_groups`)."""
        return _params.parameter_groups(self, weight_decay=weight_decay, candidate_lr=candidate_lr)

    # ------------------------------------------------------------------ checkpoints
    def perforation_record(self) -> dict[str, Any]:
        """What a checkpoint records about the dendritic structure, as plain data."""
        return {
            "version": CHECKPOINT_VERSION,
            "layers": [
                {"name": layer.name, "dendrites": layer.num_dendrites, "candidates": layer.num_candidates}
                for layer in self.perforated_layers()
            ],
            **_state.perforation_state(self),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = self.perforation_record()
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(hparams, dict):
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = self._hparams_as_plain_data(hparams)

    def _hparams_as_plain_data(self, hparams: dict[str, Any]) -> dict[str, Any]:
        """Hyperparameters with the module types of ``perforate_include/exclude`` (and the keys of
        ``perforate_neuron_axes/output_selectors``) as strings.

        ``save_hyperparameters()`` keeps the classes a user passed (``[nn.Linear]``); pickled
        into the checkpoint, they make ``load_from_checkpoint`` fail under ``weights_only=True``
        ("Unsupported global"). Only the values this module received as its selectors are
        rewritten (to ``"type:..."``, which it resolves back); other hyperparameters are the
        user's and keep their form.
        """
        ours = [s for s in (self._perforate_include, self._perforate_exclude) if s is not None]
        mappings = [m for m in (self._perforate_neuron_axes, self._perforate_output_selectors) if m is not None]
        converted = dict(hparams)
        for key, value in hparams.items():
            if isinstance(value, Mapping) and any(dict(value) == m for m in mappings):
                # neuron axes / output selectors keyed by module type: the keys become strings
                converted[key] = {(type_selector(k) or k) if isinstance(k, type) else k: v for k, v in value.items()}
                continue
            if not isinstance(value, (list, tuple)) or not any(_same_items(value, s) for s in ours):
                continue
            items = [type_selector(v) or v if isinstance(v, type) else v for v in value]
            converted[key] = tuple(items) if isinstance(value, tuple) else items
        return converted

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Perforate, then check the checkpoint's record against the model (before weights load).

        Runs in ``fit(ckpt_path=...)`` and ``load_from_checkpoint`` alike. A checkpoint of a plain
        LightningModule (no record) loads with ``load_from_checkpoint``: the result is the trained
        network, perforated with no dendrites yet, ready to be fine-tuned by the callback.
        """
        self.configure_model()
        record = checkpoint.get(_CHECKPOINT_KEY)
        if record is None:
            if self._trainer is not None:
                # fit(ckpt_path=...) would resume the plain run — its epochs, its optimizer over other
                # parameter groups, no phase machine — instead of starting the fine-tuning.
                raise PerforationError(
                    "trainer.fit(ckpt_path=...) resumes a PerforatedModule's own checkpoint, but this one "
                    "was written by a module without dendrites (it has no 'pb_lightning' record). To add "
                    "dendrites to that trained network, load its weights first — "
                    "model = YourModel.load_from_checkpoint(path), or "
                    "model.load_state_dict(torch.load(path)['state_dict']) — then call trainer.fit(model) "
                    "without ckpt_path."
                )
            # A trained network without dendrites (load_from_checkpoint): the model is perforated
            # now, and its layers map the plain weights onto the wrapped modules as they load.
            return
        check_checkpoint_version("the module's 'pb_lightning' record", record.get("version", 0))
        ours = [layer.name for layer in self.perforated_layers()]
        theirs = [layer["name"] for layer in record["layers"]]
        if ours != theirs:
            raise PerforationError(
                f"The checkpoint's perforated layers {theirs} do not match this model's {ours}; was it "
                "written by a different architecture or with different perforate_include/exclude?"
            )
        # Layers rebuild their dendrites and candidates from the state dict's shapes as it loads;
        # which parameters the dendrite phase froze is re-applied right after (post hook).
        self._pending_perforation_state = {
            "dendrite_phase": record["dendrite_phase"],
            "frozen": record["frozen"],
            "layers": record["layers"],
        }


def as_restructurer(model: nn.Module) -> PerforatedModule:
    """The :class:`~pb_lightning.cycle.restructure.Restructurer` of a Lightning fit: the module itself.

    The callback's driver restructures through the module's own phase controls, so a subclass
    that overrides them sees every restructure. Anything but a PerforatedModule is refused here,
    by name, before a fit starts.
    """
    if not isinstance(model, PerforatedModule):
        raise PerforationError(
            f"PerforatedCallback needs a pb_lightning.PerforatedModule; got {type(model).__name__}. "
            "Subclass PerforatedModule instead of LightningModule."
        )
    return model


def _same_items(value: Sequence[Any], selectors: list[Any]) -> bool:
    return len(value) == len(selectors) and all(a is b or a == b for a, b in zip(value, selectors, strict=True))


def _apply_pending_perforation_state(module: nn.Module, incompatible_keys: Any) -> None:
    if not isinstance(module, PerforatedModule):
        return
    pending = module._pending_perforation_state
    if pending is not None:
        module._pending_perforation_state = None
        _check_rebuilt_structure(module, pending["layers"])
        _state.load_perforation_state(module, pending)


def _check_rebuilt_structure(module: PerforatedModule, recorded: list[dict[str, Any]]) -> None:
    """The layers rebuild their dendrites from the tensors' shapes; the checkpoint's record must agree.

    A mismatch means the state dict and the record disagree (a hand-edited or mixed checkpoint,
    or a layer that cannot rebuild what was saved): loading it would give a different model than
    the one that was trained, so it is an error rather than a surprise later.
    """
    rebuilt = {layer.name: (layer.num_dendrites, layer.num_candidates) for layer in module.perforated_layers()}
    wrong = [
        f"{entry['name']}: recorded {entry['dendrites']} dendrite sets and {entry['candidates']} candidates, "
        f"rebuilt {rebuilt.get(entry['name'])}"
        for entry in recorded
        if rebuilt.get(entry["name"]) != (entry["dendrites"], entry["candidates"])
    ]
    if wrong:
        raise PerforationError(
            "The checkpoint's weights do not rebuild the dendritic structure it records: " + "; ".join(wrong)
        )
