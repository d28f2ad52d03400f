"""A digits index for the serve tests, and a `serve` subprocess on a free loopback port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import keras
from conftest import free_port

from siamese.catalog import load_catalog
from siamese.embed import Embedder
from siamese.models import build_embedding

ROOT = Path(__file__).resolve().parents[1]


def digits_index(digits: Path, folder: Path, limit: int | None = None, engine: str = "brute") -> tuple[Path, Embedder]:
    """An index of the digits training images (of the first `limit` items, default all ten) by an untrained
    small_cnn, saved in `folder / "index"`; with its embedder. Items are labeled even or odd, and 0 and 8 round."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.keras"
    if not model.exists():
        keras.utils.set_random_seed(0)
        build_embedding("small_cnn", 16, 16).save(model)
    embedder = Embedder.load(model)
    items = json.loads((digits / "train.json").read_text())
    for n, (item, entry) in enumerate(items.items()):
        entry["labels"] = ["even" if n % 2 == 0 else "odd", *(["round"] if item in ("digit_0", "digit_8") else [])]
    labeled = folder / "labeled.json"
    labeled.write_text(json.dumps(items))
    catalog = load_catalog(labeled, digits)
    if limit:
        catalog = catalog.subset({item.id for item in catalog.items[:limit]})
    index = embedder.index(catalog, engine, progress=False)
    return index.save(folder / "index"), embedder


class Server:
    """`python utilities.py serve --index DIR ...` in a subprocess, ready when /health answers."""

    def __init__(self, index: Path, *args: str, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(index.parent / "server.log", "w+b")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen([sys.executable, str(ROOT / "utilities.py"), "serve", "--index", str(index),
                                         "--port", str(self.port), *args], stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"serve did not answer in {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
