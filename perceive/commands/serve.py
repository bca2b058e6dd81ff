"""``perceive serve``: the JSON API and the web page over a model (``perceive.serve.app``)."""

from __future__ import annotations

import argparse

from perceive.commands import CliError, add_device_option


def cmd_serve(args: argparse.Namespace) -> int:
    from perceive.serve.app import Limits, serve

    if args.queue < 1 or args.timeout <= 0 or args.max_upload_mb <= 0:
        raise CliError("--queue, --timeout and --max-upload-mb must be positive")
    if args.header_timeout <= 0 or args.body_timeout <= 0 or args.max_connections < 1:
        raise CliError("--header-timeout, --body-timeout and --max-connections must be positive")
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), queue_size=args.queue,
                    timeout_s=args.timeout, header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                    max_connections=args.max_connections)  # fmt: skip
    try:
        serve(args.model, args.host, args.port, limits, args.allowed_host, args.allowed_origin, args.device)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="a JSON API and a web page over a trained model")
    s.add_argument("--model", default=None, help="model folder (default: the shipped checkpoints/tiny)")
    add_device_option(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--queue", type=int, default=8, help="requests waiting (and uploads read) at most; more get 429")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take; then 504")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads get 413 (chunked ones too)")
    s.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send its request line and headers; then the connection closes",
    )
    s.add_argument("--body-timeout", type=float, default=60.0, help="seconds a client has to send its upload; then 408")
    s.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections at most; the oldest one still waiting for a request head makes room",
    )
    s.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name besides localhost, 127.0.0.1, ::1 and the bound address (repeatable; * for any)",
    )
    s.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="URL",
        help="a web page origin besides the server's own that may call the API, e.g. "
        "https://perceive.example.org behind a proxy (repeatable; * for any)",
    )
    s.set_defaults(func=cmd_serve)
