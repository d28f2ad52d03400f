"""The search service in-process (FastAPI's TestClient): every endpoint against the index and embedder it serves,
and every refusal with its status and message."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from servers import digits_index

from siamese.errors import SiameseError
from siamese.search import Index
from siamese.search.rows import Rows
from siamese.serve import create_app, serve


@pytest.fixture(scope="module")
def served(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    index_dir, embedder = digits_index(digits, folder)
    return index_dir, embedder, Index.load(index_dir)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served[0], watch_seconds=0)) as c:
        yield c


def queries(index: Index, n: int = 3) -> list[str]:
    """Indexed images of `n` different items, by path."""
    image_dir = index.source["image_dir"]
    rows = [index.items.index(item) for item in sorted(set(index.items))[:n]]
    return [f"{image_dir}/{index.filenames[r]}" for r in rows]


def expected(embedder, index: Index, path: str, k: int, by_item: bool = False) -> list[dict]:
    return [{"rank": n, **m.to_dict()} for n, m in enumerate(embedder.search(index, [path], k, by_item)[0], 1)]


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [m["row"] for m in got] == [m["row"] for m in want]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and g["item"] == w["item"] and g["labels"] == w["labels"]
        assert g["similarity"] == pytest.approx(w["similarity"], abs=1e-5)


def test_search_answers_what_the_embedder_and_index_answer_in_process(client, served):
    _, embedder, index = served
    for path in queries(index):
        data = Path(path).read_bytes()
        multipart = client.post("/search", params={"k": 7}, files={"image": ("q.png", data, "image/png")})
        raw = client.post("/search?k=7", content=data, headers={"content-type": "image/png"})
        assert multipart.status_code == raw.status_code == 200, multipart.text
        assert multipart.json()["neighbours"] == raw.json()["neighbours"]
        assert_same(multipart.json()["neighbours"], expected(embedder, index, path, 7))
        assert multipart.json()["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)  # itself


def test_batch_by_item_label_and_row_searches(client, served):
    _, embedder, index = served
    paths = queries(index)
    files = [("images", (f"{n}.png", Path(p).read_bytes(), "image/png")) for n, p in enumerate(paths)]
    batch = client.post("/search/batch", params={"k": 4, "by_item": True}, files=files)
    assert batch.status_code == 200, batch.text
    assert [r["query"] for r in batch.json()] == ["0.png", "1.png", "2.png"]
    for result, path in zip(batch.json(), paths, strict=True):
        assert_same(result["neighbours"], expected(embedder, index, path, 4, by_item=True))
        assert len({m["item"] for m in result["neighbours"]}) == 4
    image = Path(paths[0]).read_bytes()
    round_only = client.post("/search", params={"k": 20, "label": "round"}, files={"image": image})
    found = round_only.json()["neighbours"]
    assert len(found) == 20 and all("round" in m["labels"] for m in found)
    brute = [m for m in expected(embedder, index, paths[0], len(index)) if "round" in m["labels"]][:20]
    assert [m["row"] for m in found] == [m["row"] for m in brute]  # the nearest 20 of the label, not a sample
    row = client.post("/search", params={"row": found[3]["row"], "k": 3}).json()
    assert row["query"] == found[3]["filename"] and row["neighbours"][0]["row"] == found[3]["row"]


def test_items_images_health_and_info(client, served):
    _, embedder, index = served
    item = client.get("/items/digit_3").json()
    rows = [r for r, i in enumerate(index.items) if i == "digit_3"]
    assert item == {"item": "digit_3", "labels": ["odd"],
                    "images": [{"row": r, "filename": index.filenames[r]} for r in rows]}
    original = client.get(f"/images/{rows[0]}")
    assert original.status_code == 200
    assert original.content == Path(f"{index.source['image_dir']}/{index.filenames[rows[0]]}").read_bytes()
    thumbnail = client.get(f"/images/{rows[0]}", params={"size": 64})
    assert thumbnail.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumbnail.content)).size == (64, 64)
    assert client.get("/health").json() == {"status": "ok", "rows": len(index)}
    info = client.get("/info").json()
    assert info["rows"] == len(index) and info["items"] == 10 and info["engine"] == "brute" and info["dim"] == 16
    assert info["model"]["fingerprint"] == embedder.info.fingerprint and info["labels"] == ["even", "odd", "round"]
    page = client.get("/")
    assert page.status_code == 200 and "siamese search" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert "/search" in client.get("/openapi.json").json()["paths"]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels in a few bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("request_", "status", "message"), [
    (dict(content=b"\0" * (30 * 2**20)), 413, r"Expected an upload of at most 20 MB\. Fix: send a smaller image"),
    (dict(content=b""), 400, r"Expected an image in the upload\. Received: nothing\. Fix: send a JPEG, PNG"),
    (dict(content=b"just some text, not a picture"), 400, r"the upload: not an image Pillow can read"),
    (dict(content=png_header(30000, 30000)), 400, r"the upload: over Pillow's limit of [\d,]+ pixels \(a decompr"),
    (dict(params={"k": 0}), 400, r"Expected 1 <= `k` <= 1,?\d+ \(the index holds"),
    (dict(params={"k": -1}), 400, r"Expected 1 <= `k` <="),
    (dict(params={"k": 10**6}), 400, r"Expected 1 <= `k` <= .*Received: 1000000"),
    (dict(params={"k": "many"}), 400, r"Expected valid parameters\. Received: query\.k: "),
    (dict(params={"row": 10**6}), 404, r"No row 1000000: the index holds rows 0 to \d+"),
    (dict(params={"label": "square"}), 404, r"No indexed image has the label 'square'"),
    (dict(files={"other": b"x"}), 400, r"Expected a file in the multipart field 'image'"),
])
def test_bad_requests_get_their_status_and_a_fix_and_the_server_keeps_serving(client, served, request_, status,
                                                                             message):
    if "params" in request_ and "content" not in request_ and "files" not in request_:
        request_ = {**request_, "content": Path(queries(served[2], 1)[0]).read_bytes()}
        if "row" in request_["params"]:
            request_.pop("content")
    response = client.post("/search", **request_)
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["detail"] and "Traceback" not in response.text
    assert re.search(message, body["detail"]), body["detail"]
    assert client.get("/health").status_code == 200


def test_unknown_items_rows_and_thumbnail_sizes(client):
    assert client.get("/items/nothing").status_code == 404
    assert "No item 'nothing' in the index" in client.get("/items/nothing").json()["detail"]
    assert client.get("/images/99999").status_code == 404
    assert client.get("/images/-1").status_code == 404
    assert client.get("/images/0", params={"size": 4000}).json() == {"detail": "Expected 8 <= size <= 512. "
                                                                                "Received: 4000"}
    assert client.get("/images/..%2F..%2Fetc%2Fpasswd").status_code == 404  # rows are numbers, never paths
    assert client.post("/search/batch", content=b"x").status_code == 400


def test_an_indexed_file_outside_the_image_folder_is_not_served(served):
    index_dir = served[0]
    moved = Index.load(index_dir)
    rows = Rows.from_lists(moved.items, ["../" * 12 + "etc/hostname", *moved.filenames[1:]], moved.labels)
    with TestClient(create_app(index_dir, watch_seconds=0)) as c:
        c.app.state.live.current.index.rows = rows
        response = c.get("/images/0")
    assert response.status_code == 404 and "is not a file inside the index's image folder" in response.text


def test_the_token_guards_the_data_and_not_the_page(served):
    with TestClient(create_app(served[0], token="s3cret", watch_seconds=0)) as c:
        refused = c.get("/info")
        assert refused.status_code == 401 and "Authorization: Bearer TOKEN" in refused.json()["detail"]
        assert c.get("/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/images/0", params={"access_token": "s3cret", "size": 32}).status_code == 200
        assert c.get("/images/0", params={"access_token": "s3cre", "size": 32}).status_code == 401
        assert c.get("/").status_code == c.get("/health").status_code == 200
    with pytest.raises(SiameseError, match=r"Expected a `token` to serve beyond this machine\. Received: host "
                                           r"0\.0\.0\.0 and no token"):
        serve(served[0], "0.0.0.0")


def test_cors_is_off_unless_an_origin_is_given(served, client):
    origin = {"Origin": "http://elsewhere.example"}
    assert "access-control-allow-origin" not in client.get("/info", headers=origin).headers
    with TestClient(create_app(served[0], cors_origin="http://elsewhere.example", watch_seconds=0)) as c:
        assert c.get("/info", headers=origin).headers["access-control-allow-origin"] == "http://elsewhere.example"


def test_requests_that_arrive_together_share_a_model_call(served, caplog):
    index_dir, _, index = served
    data = [Path(p).read_bytes() for p in queries(index, 8)] * 2
    app = create_app(index_dir, wait_ms=50, watch_seconds=0)
    batcher = app.state.live.current.batcher

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.post("/search?k=3", content=d) for d in data))

    with caplog.at_level(logging.INFO, logger="siamese.serve"):
        responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 16
    assert [r.json()["neighbours"][0]["similarity"] for r in responses] == pytest.approx([1.0] * 16, abs=1e-5)
    assert batcher.calls < 4  # 16 requests, one or a few model calls
    lines = [r.getMessage() for r in caplog.records if r.name == "siamese.serve"]
    assert sum(line.startswith("POST /search 200 ") and line.endswith(" ms") for line in lines) == 16


def test_requests_of_one_model_call_share_a_search_per_question(served):
    index_dir, embedder, index = served
    paths = queries(index, 8)
    asks = [(path, k, by_item) for path in paths for k, by_item in ((3, False), (5, False), (3, True), (0, False))]
    app = create_app(index_dir, wait_ms=50, watch_seconds=0)
    batcher = app.state.live.current.batcher

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.post("/search", params={"k": k, "by_item": by_item},
                                                 content=Path(path).read_bytes()) for path, k, by_item in asks))

    responses = asyncio.run(burst())
    for (path, k, by_item), r in zip(asks, responses, strict=True):  # each its own question's answer
        if k == 0:  # refused alone: the others of its model call are answered
            assert r.status_code == 400 and "Expected 1 <= `k` <=" in r.json()["detail"]
        else:
            assert r.status_code == 200
            assert_same(r.json()["neighbours"], expected(embedder, index, path, k, by_item))
    assert batcher.then_calls <= 4 * batcher.calls < len(asks)  # one search per question and model call


def test_reload_swaps_in_a_new_index_and_keeps_the_old_when_the_new_is_broken(served, digits, tmp_path):
    index_dir = served[0]
    folder = tmp_path / "live"
    small, _ = digits_index(digits, folder, limit=3)
    with TestClient(create_app(small, watch_seconds=0)) as c:
        live = c.app.state.live
        rows = c.get("/info").json()["rows"]
        bigger = digits_index(digits, folder, limit=5)[0]
        assert bigger == small and live.changed()
        assert live.reload() and c.get("/info").json()["rows"] > rows
        (small / "index.json").write_text(json.dumps({"format": "nonsense"}))
        assert live.changed() and not live.reload()
        assert c.get("/info").json()["items"] == 5  # still the last good index
        np.testing.assert_array_equal(live.current.index.embeddings[:1], Index.load(index_dir).embeddings[:1])
