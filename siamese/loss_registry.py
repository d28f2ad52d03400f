"""The losses `train` knows, by name, with the batches each one trains on and its settings (their code is in
`siamese.losses`, one module each; this registry imports no Keras).

An entry (`LossSpec`) names, for each way of drawing batches (`BATCHES`) the loss takes, its Keras loss class, and
the settings the class takes (`siamese.config.Setting`, each a `train` flag). Register one with
`register_loss(LossSpec(...))`: `TrainConfig(loss=...)`, `train --loss` (its choice and its settings' flags) and
training then know it. A class may be given as "module:Class", imported when training starts, so that listing the
losses (`train --help`) imports no Keras.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass

from siamese.config import BATCHES, Setting
from siamese.errors import SiameseError

DEFAULT_LOSS = {"pk": "supcon", "pairs": "contrastive"}
"""The loss `train` uses on each kind of batch when none is named."""


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: `name`; `summary`, a few words for `--loss`'s help; `classes`, its Keras loss class for
    each kind of batch it trains on (`BATCHES`), a class or "module:Class"; `settings`, the keyword arguments of
    those classes that `train` shows as flags; `drawn`, what `batches='pairs'` draws for it: pairs (y_pred the
    distance of each pair, y_true 1 for the same item) or triplets (y_pred the anchor-positive and
    anchor-negative distances). With `batches='pk'` y_pred is the batch's embeddings and y_true what
    `siamese.losses.targets.pack_relations` makes."""

    name: str
    summary: str
    classes: Mapping[str, str | type]
    settings: tuple[Setting, ...] = ()
    drawn: str = "pairs"

    def check(self, batches: str) -> None:
        """Refuse `batches` unless this loss trains on them."""
        if batches not in self.classes:
            raise SiameseError(f"Expected `batches` to be {' or '.join(map(repr, self.classes))} with "
                               f"`loss={self.name!r}`. Received: {batches!r}")

    def loss_class(self, batches: str) -> type:
        """The loss class for `batches`, imported if it was given by name."""
        self.check(batches)
        cls = self.classes[batches]
        if isinstance(cls, str):
            module, _, name = cls.partition(":")
            cls = getattr(importlib.import_module(module), name)
        return cls

    def make(self, batches: str, values: Mapping[str, object]):
        """An instance of the loss for `batches` with its settings from `values` (their defaults where absent)."""
        return self.loss_class(batches)(**{s.name: values.get(s.name, s.default) for s in self.settings})


LOSSES: dict[str, LossSpec] = {}
"""The registered losses by name, in the order of `--loss`'s choices."""


def register_loss(spec: LossSpec) -> LossSpec:
    """Add `spec` to `LOSSES` (replacing an entry of the same name) and return it."""
    unknown = set(spec.classes) - set(BATCHES)
    if not spec.classes or unknown:
        raise SiameseError(f"Expected the classes of loss {spec.name!r} to be keyed by {', '.join(BATCHES)}. "
                           f"Received: {sorted(spec.classes)}")
    if spec.drawn not in ("pairs", "triplets"):
        raise SiameseError(f"Expected `drawn` to be 'pairs' or 'triplets'. Received: {spec.drawn!r}")
    LOSSES[spec.name] = spec
    return spec


def get_loss(name: str) -> LossSpec:
    """The registered loss `name`; raises with the list of names otherwise."""
    if name not in LOSSES:
        raise SiameseError(f"Expected `loss` to be one of {', '.join(LOSSES)}. Received: {name!r}")
    return LOSSES[name]


MARGIN = Setting("margin", float, 1.0, "contrastive and triplet: how far apart a negative pair is pushed")
TEMPERATURE = Setting("temperature", float, 0.1, "supcon: the softmax temperature")
register_loss(LossSpec("contrastive", "Hadsell et al. 2006, the original's, with a --margin",
                       {"pk": "siamese.losses.contrastive:BatchContrastiveLoss",
                        "pairs": "siamese.losses.contrastive:ContrastiveLoss"}, (MARGIN,)))
register_loss(LossSpec("triplet", "on (anchor, positive, negative) triplets, with a --margin",
                       {"pk": "siamese.losses.triplet:BatchTripletLoss", "pairs": "siamese.losses.triplet:TripletLoss"},
                       (MARGIN,), drawn="triplets"))
register_loss(LossSpec("supcon", "supervised contrastive, Khosla et al. 2020, with a --temperature; pk only",
                       {"pk": "siamese.losses.supcon:BatchSupConLoss"}, (TEMPERATURE,)))
