"""``perceive ask``: one image and a question, or many (``--images FOLDER_OR_JSONL``, see ``perceive.batch``)."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from perceive.commands import CliError, add_device_option


def parse_boxes(value: str | None) -> list[list[float]] | None:
    """``--boxes``: a JSON list of ``[x0, y0, x1, y1]`` pixel boxes, inline or in a file."""
    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("["):
        path = Path(value)
        if not path.is_file():
            raise CliError(f"--boxes: not a JSON list and no such file: {value}")
        text = path.read_text()
    try:
        boxes = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"--boxes: not valid JSON ({e})") from None
    from perceive.boxes import check_pixel_boxes

    try:
        return check_pixel_boxes(boxes, "--boxes").tolist()
    except ValueError as e:
        raise CliError(str(e)) from None


def parse_prompts(values: list[str] | None) -> list | None:
    """``--prompt point:X,Y`` and the like, each into a ``perceive.prompts.VisualPrompt``."""
    if not values:
        return None
    from perceive.prompts import parse_prompt

    try:
        return [parse_prompt(v) for v in values]
    except ValueError as e:
        raise CliError(f"--prompt: {e}") from None


def cmd_ask(args: argparse.Namespace) -> int:
    from perceive.images import ImageError, load_image
    from perceive.perceiver import load

    boxes = parse_boxes(args.boxes)
    prompts = parse_prompts(args.prompt)
    if args.upn and boxes is not None:
        raise CliError("give --boxes or --upn, not both: the UPN's proposals take the place of your boxes")
    propose = released_upn_proposer(args)
    if args.images is not None:
        return _ask_many(args, boxes, propose)
    question = args.question_flag or args.question
    if args.image is None or not question:
        raise CliError("give IMAGE and a question, or --images FOLDER_OR_JSONL with --question and --out")
    try:
        image = load_image(args.image)
        if prompts:
            for p in prompts:
                p.check(image.shape[1], image.shape[0])
        perceiver = load(args.model, args.device)
        if propose is None:
            answer = perceiver.ask(image, question, boxes=boxes, prompts=prompts)
        else:
            boxes, scores = propose(image)
            if not len(boxes):
                raise CliError(f"the UPN found no box scoring at least {args.upn_min_score}; lower --upn-min-score")
            # a model that weighs its boxes (ChatRex) gets the UPN's scores with them
            weighs = "scores" in inspect.signature(perceiver.ask).parameters
            answer = perceiver.ask(image, question, boxes=boxes.tolist(), prompts=prompts,
                                   **({"scores": scores.tolist()} if weighs else {}))  # fmt: skip
    except (ImageError, FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    if args.out:
        # a word list to MVP-LM draws its panoptic segmentation; every other answer its objects
        picture = getattr(perceiver, "panoptic_picture_for", lambda *_: None)(image, question)
        (picture or answer.draw(image, show_proposals=args.show_proposals)).save(args.out)
    if args.json:
        json.dump(answer.to_json(), sys.stdout)
        print()
    else:
        print(answer.text)
        for o in answer.objects:
            name = f"<obj{o.index}> " if o.index is not None else ""
            extra = (" mask" if o.mask is not None else "") + (" keypoints" if o.keypoints is not None else "")
            print(f"  {name}{o.phrase!r}: box {[round(v, 1) for v in o.box]} score {o.score:.3f}{extra}")
        for p in answer.problems:
            print(f"  note: {p}")
        if args.out:
            print(f"wrote {args.out}")
    return 0


def released_upn_proposer(args: argparse.Namespace):
    """``--upn FILE``: image -> (boxes, scores) from the released UPN, or None without the flag."""
    if not args.upn:
        return None
    from perceive.devices import resolve_device
    from perceive.models.upn.released_loading import load_released_upn

    try:
        upn = load_released_upn(args.upn, resolve_device(args.device))
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    # the best 100 at most: ChatRex and RexSeek name a box by one of 100 tokens, <obj0>..<obj99>
    return lambda image: upn.propose(image, args.upn_prompt, min_score=args.upn_min_score, max_boxes=100)


def _ask_many(args: argparse.Namespace, boxes: list | None, propose=None) -> int:
    from perceive import batch
    from perceive.perceiver import load

    if not args.out:
        raise CliError("--images needs --out (a folder for results.jsonl, coco_results.json, pictures)")
    if args.prompt:
        raise CliError("--prompt is for one image; a JSONL of --images cannot carry prompts yet")
    try:
        perceiver = load(args.model, args.device)
        summary = batch.run(perceiver, args.images, args.question_flag or args.question, args.out, draw=args.draw,
                            progress=not args.json, boxes=boxes,
                            propose=None if propose is None else lambda image: propose(image)[0].tolist())  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    if args.json:
        json.dump(summary, sys.stdout)
        print()
    else:
        print(f"{summary['answered']} answered, {summary['errors']} unreadable, "
              f"{summary['skipped_as_done']} already done; results in {args.out}")  # fmt: skip
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("ask", help="ask a trained model about an image, or about many (--images)")
    a.add_argument("image", nargs="?")
    a.add_argument("question", nargs="?")
    a.add_argument("--question", dest="question_flag", help="the question (required with --images)")
    a.add_argument("--images", help="a folder of images or a JSONL of {image, question?, id?, boxes?}: batch mode")
    a.add_argument("--boxes", help="your own boxes instead of the model's proposals: a JSON list of [x0, y0, x1, y1] "
                                   "pixel boxes, or a file holding one (with --images: for every image)")  # fmt: skip
    a.add_argument("--upn", metavar="FILE", help="boxes from the released UPN (ChatRex's upn_large.pth, or its "
                   "safetensors from perceive convert) instead of the model's own proposals")  # fmt: skip
    a.add_argument(
        "--upn-prompt",
        choices=("fine", "coarse"),
        default="fine",
        help="the UPN's prompt: fine (objects and their parts, ChatRex's usual) or coarse (whole objects)",
    )
    a.add_argument("--upn-min-score", type=float, default=0.3, help="the UPN's boxes scoring at least this (0.3)")
    a.add_argument("--prompt", action="append", metavar="KIND:VALUES",
                   help="a visual prompt, for models that take them: point:X,Y, box:X0,Y0,X1,Y1, "
                        "scribble:X,Y;X,Y;..., mask:FILE.png (repeatable)")  # fmt: skip
    a.add_argument("--draw", action="store_true", help="batch mode: also write annotated pictures")
    a.add_argument("--model", default=None, help="model folder (default: the shipped checkpoints/tiny)")
    add_device_option(a)
    a.add_argument("--json", action="store_true", help="print the answer (batch: the summary) as JSON")
    a.add_argument("--out", help="the annotated picture (one image) or the results folder (--images)")
    a.add_argument("--show-proposals", action="store_true", help="draw the proposal boxes too")
    a.set_defaults(func=cmd_ask)
