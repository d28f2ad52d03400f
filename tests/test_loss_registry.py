"""Losses are plugins: a loss registered from outside the package trains with `train` and gets its `--loss`
choice and its settings' flags, as the built-in ones do; the registry imports no Keras."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from siamese import cli
from siamese.checkpoint import sidecar
from siamese.config import Setting, TrainConfig
from siamese.errors import SiameseError
from siamese.losses import LOSSES, LossSpec, get_loss, pack_relations, register_loss, unpack_relations
from siamese.training import train


def cosine_margin_loss(y_true, embeddings, scale: float = 4.0):
    """A P x K loss written as a user would: the mean over pairs of a sigmoid of scaled cosine similarity,
    pulling positives up and pushing negatives down (not a loss to use, a plugin to test)."""
    relation = unpack_relations(y_true)
    e = ops.cast(embeddings, "float32")
    similarity = ops.matmul(e, ops.transpose(e)) * scale
    positive, negative = ops.cast(relation == 1.0, "float32"), ops.cast(relation == 0.0, "float32")
    cost = positive * ops.softplus(-similarity) + negative * ops.softplus(similarity)
    return ops.sum(cost) / ops.maximum(ops.sum(positive + negative), 1.0)


class CosineMarginLoss(keras.losses.Loss):
    def __init__(self, scale: float = 4.0, name: str = "cosine_margin_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.scale = scale

    def call(self, y_true, y_pred):
        return cosine_margin_loss(y_true, y_pred, self.scale)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@pytest.fixture
def cosine():
    spec = register_loss(LossSpec("cosine", "a test's sigmoid of cosine similarity", {"pk": CosineMarginLoss},
                                  (Setting("scale", float, 4.0, "cosine: the similarity's scale"),)))
    yield spec
    del LOSSES["cosine"]


def test_pack_and_unpack_relations_are_inverse_for_any_share_of_the_rows():
    relations = np.array([[-1, 1, 0, 0], [1, -1, 0, 0], [0, 0, -1, 1], [0, 0, 1, -1]], np.float32)
    y = pack_relations(np.arange(4), relations)
    assert y.shape == (4, 5) and y.dtype == np.float32
    np.testing.assert_array_equal(ops.convert_to_numpy(unpack_relations(y)), relations)
    share = pack_relations(np.arange(2, 4), relations[2:])  # one replica's rows keep their positions
    np.testing.assert_array_equal(ops.convert_to_numpy(unpack_relations(share)), relations[2:, 2:])


@pytest.mark.filterwarnings("ignore:no epoch beat the untrained network")
def test_a_registered_loss_trains_one_epoch_and_is_recorded(digits, tmp_path, cosine):
    out = tmp_path / "cosine.keras"
    config = TrainConfig(str(digits / "train.json"), str(digits), out=str(out), epochs=1, image_size=16,
                         batch_size=32, images_per_epoch=64, embedding_dim=8, loss="cosine",
                         loss_settings={"scale": 8.0})
    result = train(config, verbose=0)
    assert [h["epoch"] for h in result.history] == [0, 1] and np.isfinite(result.history[1]["loss"])
    settings = json.loads(sidecar(result.checkpoint, "config").read_text())
    assert (settings["loss"], settings["batches"], settings["loss_settings"]) == ("cosine", "pk", {"scale": 8.0})


def test_the_cli_lists_a_registered_loss_and_its_settings(cosine):
    parser = cli.build_parser()
    train_help = parser.commands["train"].format_help()
    assert "cosine: a test's sigmoid of cosine similarity" in train_help
    assert "--scale SCALE" in train_help and "cosine: the similarity's scale (default 4.0)" in train_help
    args = parser.parse_args(["train", "--labeled-data", "c.json", "--image-dir", "d", "--loss", "cosine",
                              "--scale", "2"])
    assert (args.loss, args.loss_scale) == ("cosine", 2.0)


def test_a_loss_that_takes_no_drawn_pairs_is_refused_on_them(cosine):
    with pytest.raises(SiameseError, match=r"Expected `batches` to be 'pk' with `loss='cosine'`. Received: 'pairs'"):
        TrainConfig("c.json", "d", loss="cosine", batches="pairs").resolved()
    with pytest.raises(SiameseError, match=r"Expected the classes of loss 'bad' to be keyed by pk, pairs. "
                                           r"Received: \['batch-all'\]"):
        register_loss(LossSpec("bad", "", {"batch-all": CosineMarginLoss}))


def test_the_built_in_losses_make_their_classes_with_their_settings():
    assert type(get_loss("contrastive").make("pairs", {"margin": 0.5})).__name__ == "ContrastiveLoss"
    loss = get_loss("triplet").make("pk", {"margin": 0.7})
    assert (type(loss).__name__, loss.margin) == ("BatchTripletLoss", 0.7)
    assert get_loss("supcon").make("pk", {}).temperature == 0.1
    with pytest.raises(SiameseError, match="Expected `loss` to be one of contrastive, triplet, supcon"):
        get_loss("hinge")


def test_mining_is_a_deprecated_spelling_of_batches():
    with pytest.warns(DeprecationWarning, match=r"`mining` is deprecated: pass `batches`"):
        config = TrainConfig("c.json", "d", mining="batch-all").resolved()
    assert (config.batches, config.mining, config.loss) == ("pk", None, "supcon")


def test_listing_the_losses_imports_no_keras():
    code = ("import sys, siamese.loss_registry, siamese.cli; assert list(siamese.loss_registry.LOSSES) == "
            "['contrastive', 'triplet', 'supcon']; assert not any(m.split('.')[0] in ('keras', 'tensorflow') "
            "for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
