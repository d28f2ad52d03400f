"""The search service: a JSON API over an index and a web page, as an ASGI app (`create_app`).

Endpoints: `POST /search` (one image: a multipart `image` field or the raw body; or `row=` an indexed image),
`POST /search/batch` (multipart `images` fields), `GET /items/{item}`, `GET /images/{row}` (`?size=N`: a square
thumbnail), `GET /health`, `GET /info`, and the page at `/`. Errors are JSON `{"detail": "... Fix: ..."}` with
400, 401, 404 or 413; no response carries a traceback. Each request logs one line: method, path, status, ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
import os
import signal
import time
import warnings
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException

from siamese.errors import SiameseError
from siamese.images import ImageDecodeError, decode_image
from siamese.serve.live import Live, Served

log = logging.getLogger("siamese.serve")
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/", "/health", "/static/", "/docs", "/openapi.json", "/favicon.ico")
"""Paths that need no token: the page and its files, which hold no data, and the health check."""
MAX_THUMBNAIL = 512


class Problem(Exception):
    """An HTTP error with a message that names the problem and the fix."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class _Guard:
    """ASGI middleware: one log line per request, the upload limit (413), and the bearer token (401)."""

    def __init__(self, app, max_bytes: int, token: str | None):
        self.app, self.max_bytes, self.token = app, max_bytes, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            problem = self._refuse(scope)
            if problem:
                await _problem_response(problem)(scope, receive, sending)
                return
            received = [0]

            async def receiving():
                message = await receive()
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_bytes:
                    raise self._too_large()  # answered by the app's Problem handler
                return message

            await self.app(scope, receiving, sending)
        finally:
            ms = (time.perf_counter() - start) * 1000
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status[0], ms)

    def _too_large(self) -> Problem:
        mb = self.max_bytes / 2**20
        return Problem(413, f"Expected an upload of at most {mb:g} MB. Fix: send a smaller image, or start the "
                       "server with a larger --max-upload-mb.")

    def _refuse(self, scope) -> Problem | None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return self._too_large()
        path = scope["path"]
        if self.token is None or path == "/" or any(path.startswith(p) for p in OPEN_PATHS[1:]):
            return None
        sent = headers.get(b"authorization", b"").decode("latin-1")
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        given = sent.removeprefix("Bearer ").strip() if sent.startswith("Bearer ") else query.get("access_token", "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return Problem(401, "Expected the server's token. Fix: send the header 'Authorization: Bearer TOKEN' "
                           "(or ?access_token=TOKEN for images).")
        return None


def _problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse({"detail": problem.detail}, status_code=problem.status)


def _decode(data: bytes, size: int, name: str) -> np.ndarray:
    if not data:
        raise Problem(400, f"Expected an image in {name}. Received: nothing. Fix: send a JPEG, PNG, GIF, BMP or "
                      "WebP file as a multipart 'image' field or as the request body.")
    try:
        return decode_image(data, size)[None]
    except ImageDecodeError as e:
        raise Problem(400, f"{name}: {e}. Fix: send a readable image file.") from None


INLINE_DECODE_PIXELS = 256 * 256
"""Uploads of up to this many pixels (read from the header) are decoded on the event loop, in a millisecond at most (a
28 px PNG in 0.2 ms): cheaper than handing them to a thread and back. Larger ones are decoded on a thread."""


async def _decoded(data: bytes, size: int, name: str) -> np.ndarray:
    """`_decode` on the event loop for a small image, on a thread otherwise."""
    try:
        with warnings.catch_warnings():  # a bomb is refused by `_decode`, with its message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # the header only
        with im:
            small = im.width * im.height <= INLINE_DECODE_PIXELS
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        small = True  # not an image, or a bomb: `_decode` refuses it at once
    return _decode(data, size, name) if small else await asyncio.to_thread(_decode, data, size, name)


def _matches(served: Served, vectors: np.ndarray, k: int, by_item: bool, label: str | None) -> list[list[dict]]:
    if label is not None and label not in served.labels:
        raise Problem(404, f"No indexed image has the label {label!r}. Fix: pick a label that GET /info lists.")
    results = served.index.search(vectors, k, by_item, label)
    return [[{"rank": rank, **m.to_dict()} for rank, m in enumerate(matches, 1)] for matches in results]


async def _embed_and_search(served: Served, pixels: np.ndarray, k: int, by_item: bool, label: str | None) -> list:
    """`_matches` of the embeddings of `pixels`: requests of one model call with the same question share one search."""
    return await served.batcher.answer(pixels, lambda vectors: _matches(served, vectors, k, by_item, label),
                                       key=(id(served), k, by_item, label))


def create_app(index_dir: str | os.PathLike, keras_model: str | os.PathLike | None = None, *, token: str | None = None,
               max_upload_mb: float = 20, cors_origin: str | None = None, max_batch: int = 32, wait_ms: float = 2.0,
               watch_seconds: float = 1.0) -> FastAPI:
    """The search service of the index in `index_dir`, as an ASGI app (FastAPI).

    Queries are embedded by the index's own model (or `keras_model`), loaded once; concurrent requests are embedded
    together, up to `max_batch` images after at most `wait_ms` ms. The index is reloaded on SIGHUP and when its
    index.json changes (checked every `watch_seconds`; 0: never), without dropping a request. With `token`, every
    data endpoint wants 'Authorization: Bearer TOKEN'. Bodies over `max_upload_mb` get 413. `cors_origin` allows
    that origin (default: no CORS).
    """
    live = Live(index_dir, keras_model, max_batch, wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def reload() -> None:
            loop.run_in_executor(None, live.reload)

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(signal.SIGHUP, reload)
        watcher = None
        if watch_seconds > 0:
            async def watch() -> None:
                while True:
                    await asyncio.sleep(watch_seconds)
                    if live.changed():
                        await loop.run_in_executor(None, live.reload)

            watcher = asyncio.create_task(watch())
        yield
        if watcher:
            watcher.cancel()

    app = FastAPI(title="siamese search", version="1", lifespan=lifespan,
                  description="Which images are like this one? Nearest neighbours of an image in a siamese index.")
    app.state.live = live

    @app.exception_handler(Problem)
    async def problem(_: Request, e: Problem):
        return _problem_response(e)

    @app.exception_handler(SiameseError)
    async def siamese_error(_: Request, e: SiameseError):
        return _problem_response(Problem(400, str(e)))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return _problem_response(Problem(400, f"Expected valid parameters. Received: {where}. Fix: see GET /docs."))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return _problem_response(Problem(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return _problem_response(Problem(500, "The server failed on this request; its log says why."))

    async def image_of(request: Request, field: str = "image") -> bytes:
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get(field)
            if upload is None or isinstance(upload, str):
                raise Problem(400, f"Expected a file in the multipart field {field!r}. Fix: send the image as "
                              f"-F {field}=@photo.jpg.")
            return await upload.read()
        return await request.body()

    @app.post("/search")
    async def search(request: Request, k: int = Query(10, description="neighbours to return"),
                     by_item: bool = Query(False, description="the best image of each of k items"),
                     label: str | None = Query(None, description="only images with this label"),
                     row: int | None = Query(None, description="search by this indexed image instead of an upload")):
        """The k nearest images of one image: rank, row, item, filename, labels, distance, similarity."""
        served = live.current
        if row is not None:
            _check_row(served, row)
            vectors = np.asarray(served.index.embeddings[row : row + 1], np.float32)
            query = served.index.filenames[row]
            neighbours = await asyncio.to_thread(_matches, served, vectors, k, by_item, label)
        else:
            pixels = await _decoded(await image_of(request), served.batcher.image_size, "the upload")
            neighbours, query = await _embed_and_search(served, pixels, k, by_item, label), "upload"
        return JSONResponse({"query": query, "neighbours": neighbours[0]})  # plain JSON: FastAPI's encoder costs 1 ms

    @app.post("/search/batch")
    async def search_batch(request: Request, k: int = Query(10), by_item: bool = Query(False),
                           label: str | None = Query(None)):
        """The k nearest images of each image of the multipart `images` fields, in order."""
        served = live.current
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise Problem(400, "Expected a multipart body with one 'images' field per image. Fix: send "
                          "-F images=@a.jpg -F images=@b.jpg.")
        form = await request.form()
        uploads = [u for u in form.getlist("images") if not isinstance(u, str)]
        if not uploads:
            raise Problem(400, "Expected at least one file in the multipart field 'images'. Received: none.")
        names = [u.filename or f"image {n}" for n, u in enumerate(uploads)]
        datas = [await u.read() for u in uploads]
        size = served.batcher.image_size
        decoded = [await _decoded(data, size, name) for data, name in zip(datas, names, strict=True)]
        pixels = np.concatenate(decoded)
        neighbours = await _embed_and_search(served, pixels, k, by_item, label)
        return JSONResponse([{"query": n, "neighbours": r} for n, r in zip(names, neighbours, strict=True)])

    @app.get("/items/{item_id:path}")
    async def item(item_id: str):
        """An item's images (row, filename) and labels."""
        served = live.current
        index = served.index
        rows = index.rows.of_item(item_id)
        if not len(rows):
            raise Problem(404, f"No item {item_id!r} in the index. Fix: use an item id that /search returned.")
        taken = index.rows.take(rows)  # (item, filename, labels) of each
        images = [{"row": int(r), "filename": filename} for r, (_, filename, _) in zip(rows, taken, strict=True)]
        labels = sorted({label for *_, of_row in taken for label in of_row})
        return {"item": item_id, "labels": labels, "images": images}

    @app.get("/images/{row}")
    async def image(row: int, size: int | None = Query(None, description="a square thumbnail of this many pixels")):
        """The indexed image file of `row`, or a `size` x `size` PNG thumbnail of it."""
        served = live.current
        path = _row_file(served, row)
        if size is None:
            return FileResponse(path)
        if not 8 <= size <= MAX_THUMBNAIL:
            raise Problem(400, f"Expected 8 <= size <= {MAX_THUMBNAIL}. Received: {size}")
        try:
            pixels = await asyncio.to_thread(decode_image, path, size)
        except ImageDecodeError as e:
            raise Problem(404, f"Row {row}: {e}. Fix: re-index after fixing the image file.") from None
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG")
        return Response(out.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=60"})

    @app.get("/health")
    async def health():
        """"ok" and the rows served."""
        return {"status": "ok", "rows": len(live.current.index)}

    @app.get("/info")
    async def info():
        """The engine, rows, items, model fingerprint and source, recall@10 and labels of the served index."""
        return live.current.info()

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if cors_origin:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_Guard, max_bytes=int(max_upload_mb * 2**20), token=token)
    return app


def _check_row(served: Served, row: int) -> None:
    """Refuse a `row` the index does not hold, with 404."""
    if not 0 <= row < len(served.index):
        raise Problem(404, f"No row {row}: the index holds rows 0 to {len(served.index) - 1}. Fix: use a row that "
                      "/search returned.")


def _row_file(served: Served, row: int) -> Path:
    """The file of indexed `row`, resolved inside the index's image folder; 404 otherwise."""
    _check_row(served, row)
    if served.image_dir is None:
        raise Problem(404, "This index does not record its image folder. Fix: rebuild it with `index`.")
    filename = served.index.filenames[row]
    path = (served.image_dir / filename).resolve()
    if not path.is_relative_to(served.image_dir) or not path.is_file():
        raise Problem(404, f"Row {row}: {filename} is not a file inside the index's image folder. "
                      "Fix: re-index, or restore the file.")
    return path
