"""Pictures for the notebook: sample images per item and pairs, drawn with matplotlib."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from siamese.catalog import Catalog
from siamese.images import decode_image
from siamese.pairs import Pairs


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
