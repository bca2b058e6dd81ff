"""``perceive serve``: the JSON API and the web page over a model (``perceive.serve.app``)."""

from __future__ import annotations

import argparse

from perceive.commands import CliError


def cmd_serve(args: argparse.Namespace) -> int:
    from perceive.serve.app import Limits, serve

    if args.queue < 1 or args.timeout <= 0 or args.max_upload_mb <= 0:
        raise CliError("--queue, --timeout and --max-upload-mb must be positive")
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), queue_size=args.queue,
                    timeout_s=args.timeout)  # fmt: skip
    try:
        serve(args.model, args.host, args.port, limits)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="a JSON API and a web page over a trained model")
    s.add_argument("--model", default=None, help="model folder (default: the shipped checkpoints/tiny)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--queue", type=int, default=8, help="requests waiting at most; more get 429")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take; then 504")
    s.add_argument("--max-upload-mb", type=float, default=10.0)
    s.set_defaults(func=cmd_serve)
