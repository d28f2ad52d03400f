"""`serve`: a search service over an index, with a JSON API and a web page."""

from __future__ import annotations

import argparse

NAME = "serve"
TENSORFLOW = True


def register(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        NAME, help="serve an index: a JSON search API and a web page (FastAPI on uvicorn)",
        description="Answer 'which images are like this one?' over HTTP: POST /search (an image), POST "
        "/search/batch, GET /items/ID, GET /images/ROW, GET /health, GET /info, the OpenAPI docs at /docs and a "
        "search page at /. Requests that arrive together are embedded in one model call. SIGHUP, or a new "
        "index.json in --index, loads the new index beside the old and swaps without dropping a request.",
    )
    g = p.add_argument_group("index")
    g.add_argument("--index", required=True, metavar="DIR", help="index folder written by `index`")
    g.add_argument("--keras-model", metavar="M",
                   help="embed queries with this model (default: the one the index records)")
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "any other needs --token)")
    g.add_argument("--port", type=int, default=8000, help="default 8000")
    g.add_argument("--token", default=None, help="bearer token every data request must send (default: "
                   "$SIAMESE_TOKEN; required beyond 127.0.0.1)")
    g.add_argument("--cors-origin", metavar="ORIGIN", help="allow browser requests from this origin (default: none)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-upload-mb", type=float, default=20, metavar="MB", help="larger bodies get 413 (default 20)")
    g.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="images embedded in one model call at most (default 32)")
    g.add_argument("--wait-ms", type=float, default=2.0, metavar="MS",
                   help="how long a request waits for others to share its model call (default 2)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from siamese.serve import serve

    serve(args.index, args.host, args.port, token=args.token, keras_model=args.keras_model,
          max_upload_mb=args.max_upload_mb, cors_origin=args.cors_origin, max_batch=args.max_batch,
          wait_ms=args.wait_ms)
    return 0
