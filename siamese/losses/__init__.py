"""The losses `train` knows, one module each: contrastive (Hadsell, Chopra and LeCun, CVPR 2006), triplet, and
supervised contrastive (Khosla et al., NeurIPS 2020), each a function and a serializable Keras loss
(`pairwise.SettingsLoss`); importing this package registers them with Keras, so saved models that use them load.
Which loss trains on which batches, with which settings, is `siamese.loss_registry` (`LOSSES`), which imports no
Keras, so that `train --help` lists them at once.

Label convention (as in `siamese.pairs`): **y = 1 for the same item**, y = 0 for different items. A loss over a
P x K batch (`batches='pk'`, the `batch_*` forms) takes the embeddings of the batch, or `(b, views, dim)` for several
augmented views of each image, which are then positives of each other (instance positives, as in SimCLR and SupCon),
and the `y_true` of `siamese.losses.targets`.
"""

from siamese.loss_registry import BATCHES, DEFAULT_LOSS, LOSSES, LossSpec, get_loss, register_loss
from siamese.losses.contrastive import BatchContrastiveLoss, ContrastiveLoss, batch_contrastive_loss, contrastive_loss
from siamese.losses.supcon import BatchSupConLoss, batch_supcon_loss
from siamese.losses.targets import pack_relations, unpack_relations
from siamese.losses.triplet import BatchTripletLoss, TripletLoss, batch_triplet_loss, triplet_loss

__all__ = ["BATCHES", "DEFAULT_LOSS", "LOSSES", "BatchContrastiveLoss", "BatchSupConLoss", "BatchTripletLoss",
           "ContrastiveLoss", "LossSpec", "TripletLoss", "batch_contrastive_loss", "batch_supcon_loss",
           "batch_triplet_loss", "contrastive_loss", "get_loss", "pack_relations", "register_loss", "triplet_loss",
           "unpack_relations"]
