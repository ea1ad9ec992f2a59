"""`kimia serve`: load a model folder once, warm it up, and serve the HTTP API with uvicorn.

`add_serve_parser(subparsers)` adds the sub-command (the lead wires it into kimia/cli.py) and
`run_serve_cli(args)` runs it. Every `ServerSettings` field can also come from `KIMIA_SERVE_*` variables.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP API, realtime websocket and web page",
                              description="Serve a Kimi-Audio model folder over HTTP (loopback by default).")
    p.add_argument("model", nargs="?", default=None,
                   help="model folder (official release layout or kimia native layout; default: the shipped kimia-small)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--model-name", default=None, help="the model id clients name (default kimi-audio)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: by device)")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8"],
                   help="LLM weight quantization (auto: what the model folder recommends for the device)")
    p.add_argument("--no-detokenizer", action="store_true", help="text answers only (skip the detokenizer)")
    p.add_argument("--batch-size", type=int, default=None, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=None, help="waiting requests before 429 (default 64)")
    p.add_argument("--max-upload-bytes", type=int, default=None)
    p.add_argument("--max-audio-seconds", type=float, default=None)
    p.add_argument("--request-timeout", type=float, default=None, help="seconds per request (default 300)")
    p.add_argument("--max-tokens", type=int, default=None, help="default generation steps per request")
    p.add_argument("--cors-origin", action="append", default=None, help="allow this CORS origin (repeatable)")
    p.add_argument("--no-warmup", action="store_true")
    p.set_defaults(func=run_serve_cli)
    return p


def settings_from_args(args: argparse.Namespace):
    from kimia.server.settings import ServerSettings

    given = {"host": args.host, "port": args.port, "api_key": args.api_key, "model_name": args.model_name,
             "batch_size": args.batch_size, "max_queue": args.max_queue, "max_upload_bytes": args.max_upload_bytes,
             "max_audio_seconds": args.max_audio_seconds, "request_timeout_s": args.request_timeout,
             "default_max_tokens": args.max_tokens, "cors_origins": args.cors_origin}
    kw = {k: v for k, v in given.items() if v is not None}
    if args.no_warmup:
        kw["warmup"] = False
    return ServerSettings(**kw)


def run_serve_cli(args: argparse.Namespace) -> int:
    import uvicorn

    from kimia.server.app import create_app

    settings = settings_from_args(args)
    app = create_app(args.model, settings, load_detokenizer=not args.no_detokenizer, device=args.device,
                     dtype=args.dtype, quantize=args.quantize)
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines%s", settings.host,
                    "" if settings.api_key else " WITHOUT an API key")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0
