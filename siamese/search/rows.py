"""The rows of an index (item, filename and labels of each image) as an Arrow table, memory-mapped from the index's
`rows-<hash>.arrow` (an uncompressed Arrow IPC file) when loaded: a query reads its k rows by position, and no
Python object is made per indexed row. `Rows.items`, `.filenames` and `.labels` are read-only sequences over it.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np

CHUNK_ROWS = 1 << 20
"""Rows per record batch of the file: a batch's string offsets are 32-bit, so it holds up to 2 GiB of text."""


def _schema():
    import pyarrow as pa

    return pa.schema([("item", pa.string()), ("filename", pa.string()), ("labels", pa.list_(pa.string()))])


class Column(Sequence):
    """One column of `Rows`, read by position: `column[i]`, `len`, iteration a record batch at a time, and `==`
    another sequence of the same values (a list, a tuple, another column)."""

    def __init__(self, array, convert=None):
        self._array, self._convert = array, convert

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        value = self._array[int(i)].as_py()
        return self._convert(value) if self._convert else value

    def __iter__(self) -> Iterator:
        for chunk in self._array.chunks:
            values = chunk.to_pylist()
            yield from map(self._convert, values) if self._convert else values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"<Column of {len(self)} rows>"


def _path_of(file: str | os.PathLike | IO[bytes]) -> str | None:
    """A path that opens `file`: itself, or for an open file (e.g. an unnamed temporary one) /proc/self/fd/N where
    Linux has it; None where it has no path."""
    if not hasattr(file, "fileno"):
        return os.fspath(file)
    path = f"/proc/self/fd/{file.fileno()}"
    return path if os.path.exists(path) else None


class Rows:
    """The item, filename and labels of every row of an index, in an Arrow table (`table`)."""

    def __init__(self, table, file=None):
        if table.schema != _schema():
            raise ValueError(f"expected the columns {_schema()}, found {table.schema}")
        self.table = table
        self._file = file  # what `open` mapped: a path, or an open file object the rows keep open

    @classmethod
    def from_lists(cls, items: Sequence[str], filenames: Sequence[str], labels: Sequence[Sequence[str]]) -> Rows:
        """Rows of one item, filename and labels each (ValueError when the lengths differ)."""
        import pyarrow as pa

        if not len(items) == len(filenames) == len(labels):
            raise ValueError(f"{len(items)} items, {len(filenames)} filenames, {len(labels)} labels")
        arrays = [pa.array(list(items), pa.string()), pa.array(list(filenames), pa.string()),
                  pa.array([list(x) for x in labels], pa.list_(pa.string()))]
        return cls(pa.Table.from_arrays(arrays, schema=_schema()))

    @classmethod
    def concat(cls, parts: Sequence[Rows]) -> Rows:
        """The rows of `parts`, one after another (no copy)."""
        import pyarrow as pa

        return cls(pa.concat_tables([p.table for p in parts]))

    @classmethod
    def open(cls, file: str | os.PathLike | IO[bytes]) -> Rows:
        """The rows of the Arrow IPC file `file` (a path, or an open binary file, e.g. an unnamed temporary one,
        which the rows then keep open), memory-mapped (pyarrow's errors when it is not one of rows)."""
        import pyarrow as pa

        path = _path_of(file)
        if path is None:  # an open file with no path to map it by (not Linux): read into memory
            file.seek(0)
            return cls(pa.ipc.open_file(pa.PythonFile(file, "r")).read_all(), file)
        # zero-copy: the table's buffers are the mapped file's pages, which they keep mapped
        return cls(pa.ipc.open_file(pa.memory_map(path)).read_all(), file)

    def write(self, path: str | os.PathLike) -> None:
        """Write the rows to `path` as an uncompressed Arrow IPC file of CHUNK_ROWS-row record batches; rows `open`ed
        from a file are that file, copied by the kernel (its pages are not read into this process)."""
        import pyarrow as pa

        source = None if self._file is None else _path_of(self._file)
        if source is not None and os.path.exists(source):  # a path gone since (a swapped folder): written anew
            shutil.copyfile(source, path)
            return
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, _schema()) as writer:
            writer.write_table(self.table, max_chunksize=CHUNK_ROWS)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def items(self) -> Column:
        return Column(self.table.column("item"))

    @property
    def filenames(self) -> Column:
        return Column(self.table.column("filename"))

    @property
    def labels(self) -> Column:
        return Column(self.table.column("labels"), tuple)

    def take(self, positions: np.ndarray) -> list[tuple[str, str, tuple[str, ...]]]:
        """(item, filename, labels) of the rows at `positions`, in their order."""
        taken = self.table.take(np.asarray(positions, np.int64)).to_pydict()
        return list(zip(taken["item"], taken["filename"], map(tuple, taken["labels"]), strict=True))

    @functools.cached_property
    def item_count(self) -> int:
        """How many distinct items the rows hold (counted once: the rows never change)."""
        import pyarrow.compute as pc

        return pc.count_distinct(self.table.column("item")).as_py()

    def of_item(self, item: str) -> np.ndarray:
        """The rows (ascending) of `item`, found by one vectorised scan of the column."""
        import pyarrow.compute as pc

        return np.flatnonzero(pc.equal(self.table.column("item"), item).to_numpy(zero_copy_only=False))

    def all_labels(self) -> list[str]:
        """Every label of the rows, once each, sorted."""
        import pyarrow.compute as pc

        return sorted(pc.unique(pc.list_flatten(self.table.column("labels"))).to_pylist())
