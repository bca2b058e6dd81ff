"""``perceive parse --format F``: model output text on stdin, its parse as JSON on stdout.

Stdin must be UTF-8: anything else stops the command with one line naming the first bad byte and exit
status 1, rather than parsing a text changed by replacement characters. The output is strict UTF-8 JSON
(no NaN or Infinity); what the parsers could not read is in its ``problems``.
"""

from __future__ import annotations

import argparse
import json
import sys

from perceive.commands import CliError


def _decode_stdin(data: bytes) -> str:
    """``data`` as UTF-8, or a CliError naming the line and byte where it stops being UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise CliError(
            f"stdin is not UTF-8: byte 0x{data[e.start]:02x} at line {line}, byte {column} ({e.reason}); "
            "convert it first, e.g. with iconv -t utf-8"
        ) from None


def cmd_parse(args: argparse.Namespace) -> int:
    from perceive.formats import chatrex, coords, mvp, refvlm

    text = _decode_stdin(sys.stdin.buffer.read())
    if args.format == "chatrex":
        result = chatrex.parse(text, args.num_boxes).to_json()
    elif args.format == "refvlm":
        result = refvlm.parse(text).to_json()
    elif args.format == "mvp":
        r = mvp.parse_response(text)
        result = {"caption": r.caption, "per_offset": r.per_offset, "problems": list(r.problems)}
    elif args.format == "coords":
        result = coords.parse(text, units=args.units).to_json()
    else:  # "qwen-json"
        result = coords.parse_json(text).to_json()
    # UTF-8 bytes whatever the locale says stdout is: the text may hold any character
    out = json.dumps(result, ensure_ascii=False, allow_nan=False) + "\n"
    sys.stdout.flush()
    sys.stdout.buffer.write(out.encode("utf-8"))
    sys.stdout.buffer.flush()
    return 0


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {n}")
    return n


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parse", help="parse model output text read on stdin; print JSON")
    p.add_argument("--format", required=True, choices=["chatrex", "refvlm", "mvp", "coords", "qwen-json"])
    p.add_argument("--num-boxes", type=_non_negative_int, default=None,
                   help="number of input boxes (chatrex): larger indices are reported as problems")  # fmt: skip
    p.add_argument("--units", choices=["pixels", "bins"], default="pixels", help="coordinate units (coords)")
    p.set_defaults(func=cmd_parse)
