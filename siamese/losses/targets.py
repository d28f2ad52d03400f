"""What `y_true` carries for a loss over a P x K batch (`--batches pk`): one helper packs it, one unpacks it.

Row i of a batch's `y_true` is `(position, relations...)`: its image's position in the whole batch of B images,
then `PKSampler.relations` of it to each image of that batch (1 same item, 0 different items sharing no label,
-1 no pair: itself, or items sharing a label). A part of the rows (one replica's share under `tf.distribute`)
keeps its positions in the whole batch, so the pairs among them are found in any share.
"""

from __future__ import annotations

import numpy as np
from keras import ops


def pack_relations(positions: np.ndarray, relations: np.ndarray) -> np.ndarray:
    """`y_true` float32 `(rows, 1 + B)` of rows at `positions` (int, `(rows,)`) with `relations` `(rows, B)`."""
    return np.hstack([np.asarray(positions, np.float32)[:, None], np.asarray(relations, np.float32)])


def unpack_relations(y_true):
    """The relations `(rows, rows)` float32 of the rows of `y_true` (see `pack_relations`) among themselves."""
    y = ops.cast(y_true, "float32")
    return ops.take(y[:, 1:], ops.cast(y[:, 0], "int32"), axis=1)
