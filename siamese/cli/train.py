"""`train`: train a siamese embedding network on a labeled catalog."""

from __future__ import annotations

import argparse
import dataclasses

from siamese.cli.common import add_catalog_args, deprecated
from siamese.config import TrainConfig
from siamese.loss_registry import DEFAULT_LOSS, LOSSES

NAME = "train"
TENSORFLOW = True
GROUPS = {"catalog": None, "output": None, "model": None, "batches and loss": None, "augmentation": None,
          "optimiser": None, "validation": "the held-out items that pick the best epoch"}
"""The argument groups of `train --help`, in order; each flag is a `TrainConfig` field that names its group."""
TYPES = {"int": int, "float": float, "str": str}


def _add_flag(p, group, field: dataclasses.Field) -> None:
    """The flag of a `TrainConfig` field, from what `siamese.config.flag` declared with it."""
    meta = dict(field.metadata)
    name, default = field.name, field.default
    option = meta.pop("flag", None) or f"--{name.replace('_', '-')}"
    text = meta.pop("help")
    shown = meta.pop("default_text")
    if shown is None:
        shown = f"default {'on' if default else 'off'}" if isinstance(default, bool) else f"default {default}"
    kwargs = {"dest": name, "default": default, "help": f"{text} ({shown})" if text and shown else text or shown}
    old = meta.pop("old", ())
    meta.pop("group")
    if field.type == "bool":
        kwargs["action"] = meta.pop("action", argparse.BooleanOptionalAction)
    else:
        kwargs["type"] = meta.pop("type", TYPES[field.type.removesuffix(" | None")])
    action = group.add_argument(option, **kwargs, **meta)
    if old:
        deprecated(p, action, *old)


def _add_loss_flags(group) -> None:
    """--loss, whose choices and help are the registered losses (`siamese.loss_registry.LOSSES`), and a flag for
    each of their settings: the `TrainConfig` field of that name (margin, temperature), else `loss_settings`."""
    fields = TrainConfig.__dataclass_fields__
    defaults = ", ".join(f"{loss} with --batches {batches}" for batches, loss in DEFAULT_LOSS.items())
    losses = "; ".join(f"{name}: {spec.summary}" for name, spec in LOSSES.items())
    group.add_argument("--loss", choices=list(LOSSES), help=f"{losses} (default: {defaults})")
    added = set()
    for spec in LOSSES.values():
        for setting in spec.settings:
            name = setting.name
            if name not in added:  # a setting of several losses (margin) is one flag
                added.add(name)
                default = fields[name].default if name in fields else setting.default
                group.add_argument(setting.cli_flag, dest=name if name in fields else f"loss_{name}",
                                   type=setting.type, metavar=setting.metavar or name.upper(),
                                   default=default if name in fields else None,
                                   help=f"{setting.help} ({setting.default_text or f'default {default}'})")


def register(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        NAME, help="train a siamese embedding network on a labeled catalog",
        description="Train an embedding network with a contrastive loss over every pair of images in batches of a "
        "few images of each of several items, drawn fresh every epoch (--batches pairs: over pairs drawn one by "
        "one), with --augment each image augmented in training only. Runs the checks of validate first, scores the "
        "held-out items before training and after every epoch, keeps the best model by --monitor at --output (the "
        "untrained network when no epoch beats it, with a warning; .config.json, .manifest.json and .history.json "
        "beside it), and resumes from the last finished epoch when the same command is run again after a crash.",
    )
    groups = {name: add_catalog_args(p) if name == "catalog" else p.add_argument_group(name, description)
              for name, description in GROUPS.items()}
    for field in dataclasses.fields(TrainConfig):
        if "group" in field.metadata:
            _add_flag(p, groups[field.metadata["group"]], field)
    _add_loss_flags(groups["batches and loss"])
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    fields = set(TrainConfig.__dataclass_fields__)
    settings = {k.removeprefix("loss_"): v for k, v in vars(args).items() if k.startswith("loss_") and v is not None}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}, loss_settings=settings)
    config.resolved()  # settings errors before any catalog is read
    from siamese.checkpoint import sidecar
    from siamese.training import train

    result = train(config, verbose=2 if args.no_progress else "auto")
    value = "n/a" if result.best is None else f"{result.best:.4f}"
    if result.monitor == "loss":
        print(f"Nothing held out to choose by: the last epoch's model (epoch {result.best_epoch}, loss {value}): "
              f"{result.checkpoint}")
    else:
        print(f"Best {result.monitor} {value} at epoch {result.best_epoch}: {result.checkpoint}")
    print(f"Settings: {sidecar(result.checkpoint, 'config')}; manifest: {sidecar(result.checkpoint, 'manifest')}; "
          f"history: {sidecar(result.checkpoint, 'history')}")
    return 0
