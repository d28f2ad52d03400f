"""Pictures for the notebook and the demo, drawn with matplotlib: sample images per item, pairs, training
curves, pair-distance histograms, nearest-neighbour grids and a 2-D map of the embeddings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from siamese.catalog import Catalog
from siamese.images import decode_image
from siamese.pairs import Pairs
from siamese.retrieval import Evaluation


def image_grid(rows: Sequence[Sequence[np.ndarray]], row_titles: Sequence[str] = (),
               titles: Sequence[Sequence[str]] = (), colors: Sequence[Sequence[str]] = (), size: float = 1.5):
    """A figure with one row of images per entry of `rows`; optional row titles, image titles and their colours."""
    import matplotlib.pyplot as plt

    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(size * ncols, size * len(rows)), squeeze=False)
    for r, images in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(images[c])
                if titles and c < len(titles[r]):
                    color = colors[r][c] if colors and c < len(colors[r]) else "black"
                    ax.set_title(titles[r][c], fontsize=8, color=color)
        if r < len(row_titles):
            axes[r][0].set_ylabel(row_titles[r], rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def show_items(catalog: Catalog, items: int = 8, per_item: int = 6, image_size: int = 96, seed: int = 0):
    """A grid of `per_item` images for `items` randomly chosen items, one row each, decoded for the model."""
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(catalog), min(items, len(catalog)), replace=False))
    rows, names = [], []
    for i in chosen:
        item = catalog.items[i]
        files = item.filenames[:per_item]
        rows.append([decode_image(catalog.image_dir / f, image_size) for f in files])
        labels = f" [{', '.join(item.labels)}]" if item.labels else ""
        names.append(f"{item.id}{labels}\n({len(item.filenames)} images)")
    return image_grid(rows, row_titles=names)


def show_batch(catalog: Catalog, batch: np.ndarray, rows: int = 8, image_size: int = 96):
    """The first `rows` items of a P x K batch (`PKSampler.batches`), one row of its K images each: every two
    images of a row are a positive pair, and two of different rows a negative one (items sharing no label)."""
    items = catalog.image_item[batch]
    order = list(dict.fromkeys(items.tolist()))[:rows]
    images = [[decode_image(catalog.paths[i], image_size) for i in batch[items == item]] for item in order]
    return image_grid(images, row_titles=[catalog.items[item].id for item in order])


def show_pairs(catalog: Catalog, pairs: Pairs, n: int = 8, image_size: int = 96):
    """The first `n` pairs as two rows (first and second image), titled same (green) or different (red)."""
    n = min(n, len(pairs.same))
    items = catalog.image_item
    top = [decode_image(catalog.paths[a], image_size) for a in pairs.first[:n]]
    bottom = [decode_image(catalog.paths[b], image_size) for b in pairs.second[:n]]
    titles = [[("same" if s else "different") + f"\n{catalog.items[items[a]].id}"
               for s, a in zip(pairs.same[:n], pairs.first[:n], strict=True)],
              [catalog.items[items[b]].id for b in pairs.second[:n]]]
    colors = [["tab:green" if s else "tab:red" for s in pairs.same[:n]]] * 2
    return image_grid([top, bottom], titles=titles, colors=colors)


def plot_history(history: Sequence[dict]):
    """Training curves from `train`'s history (one dict per epoch, epoch 0 the untrained network): loss and
    val_loss, and the held-out items' precision@1 and MAP@R."""
    import matplotlib.pyplot as plt

    epochs = [h.get("epoch", n + 1) for n, h in enumerate(history)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key, style in (("loss", "-o"), ("val_loss", "--o")):
        if any(key in h for h in history):
            left.plot(epochs, [h.get(key, np.nan) for h in history], style, label=key.replace("_", " "))
    left.set(xlabel="epoch", ylabel="loss", title="Loss")
    left.legend()
    curves = (("val_precision_at_1", "precision@1", "tab:green"), ("val_map_at_r", "MAP@R", "tab:blue"))
    for key, label, color in curves:
        if any(key in h for h in history):
            right.plot(epochs, [h.get(key, np.nan) for h in history], "-o", color=color, label=label)
    right.set(xlabel="epoch (0: untrained)", ylabel="retrieval", title="Held-out items (never trained on)")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def plot_distances(evaluations: dict[str, Evaluation], bins: int = 50):
    """Histograms of same-item and different-item pair distances, one panel per named evaluation, with the
    calibrated threshold: the further apart the two humps, the better the embedding separates items."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(evaluations), figsize=(5 * len(evaluations), 3.5), squeeze=False, sharey=True)
    for ax, (name, e) in zip(axes[0], evaluations.items(), strict=True):
        edges = np.linspace(0, max(2.0, float(e.distances.max())), bins + 1)
        same = e.same.astype(bool)
        ax.hist(e.distances[same], edges, alpha=0.6, color="tab:green", label="same item")
        ax.hist(e.distances[~same], edges, alpha=0.6, color="tab:red", label="different items")
        t = e.threshold
        ax.axvline(t.distance, color="black", linestyle="--",
                   label=f"threshold {t.distance:.2f}\nprecision {t.precision:.2f}, recall {t.recall:.2f}")
        ax.set(xlabel="Euclidean distance of the embeddings", title=name)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("pairs")
    fig.tight_layout()
    return fig


def show_neighbours(embedder, index, queries: Sequence[str | os.PathLike], image_dir: str | os.PathLike | None = None,
                    query_items: Sequence[str] = (), k: int = 6, image_size: int = 96):
    """One row per query image: the query, then its `k` nearest images in `index` (`siamese.index.Index`) as
    `embedder` (`siamese.embed.Embedder`, the model that built it) finds them, with their item and cosine
    similarity, green when the item is the query's and red when not.

    A query that is itself in the index is not shown as its own neighbour. `image_dir` (default: the one the
    index records) is where the index's filenames are; `query_items` gives the right item of queries that
    are not in the index (by default found in the index by file).
    """
    image_dir = Path(image_dir or index.source.get("image_dir", "."))
    rows_by_path = {(image_dir / f).resolve(): row for row, f in enumerate(index.filenames)}
    found = embedder.search(index, list(queries), min(k + 1, len(index)))
    rows, titles, colors, names = [], [], [], []
    for n, (query, matches) in enumerate(zip(queries, found, strict=True)):
        own = rows_by_path.get(Path(query).resolve())
        item = query_items[n] if n < len(query_items) else (index.items[own] if own is not None else None)
        matches = [m for m in matches if m.row != own][:k]
        rows.append([decode_image(query, image_size)] + [decode_image(image_dir / m.filename, image_size)
                                                        for m in matches])
        titles.append(["query"] + [f"{m.item}\n{m.similarity:.3f}" for m in matches])
        colors.append(["black"] + ["tab:green" if m.item == item else "tab:red" for m in matches])
        names.append(str(item) if item is not None else Path(query).name)
    return image_grid(rows, row_titles=names, titles=titles, colors=colors)


def plot_projection(embeddings: np.ndarray, items: Sequence[str], method: str = "pca", seed: int = 0,
                    max_legend: int = 20):
    """The embeddings in 2-D, one colour per item: `method` pca (default, fast) or tsne (slower, keeps
    neighbourhoods). Tight, separate clusters mean the network tells the items apart."""
    import matplotlib.pyplot as plt

    if method == "pca":
        from sklearn.decomposition import PCA

        points = PCA(2, random_state=seed).fit_transform(embeddings)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        points = TSNE(2, init="pca", random_state=seed, perplexity=min(30, len(embeddings) - 1)).fit_transform(
            embeddings)
    else:
        raise ValueError(f"Expected method pca or tsne. Received: {method!r}")
    names, codes = np.unique(np.asarray(items), return_inverse=True)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for c, name in enumerate(names):
        chosen = codes == c
        ax.scatter(points[chosen, 0], points[chosen, 1], s=8, alpha=0.7, color=cmap(c % cmap.N),
                   label=name if len(names) <= max_legend else None)
    if len(names) <= max_legend:
        ax.legend(markerscale=2, fontsize=8, loc="best")
    ax.set(title=f"Embeddings in 2-D ({method.upper()}), one colour per item", xticks=[], yticks=[])
    fig.tight_layout()
    return fig
