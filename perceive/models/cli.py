"""``perceive train``, ``perceive ask`` and ``perceive info``."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_train(args: argparse.Namespace) -> int:
    from perceive.cli import CliError
    from perceive.train.trainer import RECIPES, train

    if args.config not in RECIPES:
        raise CliError(f"unknown config {args.config!r}; known: {', '.join(RECIPES)}")
    out = train(args.config, args.out, progress=not args.quiet, stop_after=args.stop_after)
    model = out / "model"
    if model.is_dir():
        print(f"trained model in {model} (loss curve: {out / 'loss_curve.png'})")
    else:
        print(f"stopped early; run the same command again to resume from {out / 'checkpoints'}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from perceive.cli import CliError
    from perceive.images import ImageError, load_image
    from perceive.perceiver import Perceiver

    if args.images is not None:
        return _ask_many(args)
    question = args.question_flag or args.question
    if args.image is None or not question:
        raise CliError("give IMAGE and a question, or --images FOLDER_OR_JSONL with --question and --out")
    try:
        image = load_image(args.image)
        perceiver = Perceiver.from_pretrained(args.model)
        answer = perceiver.ask(image, question)
    except (ImageError, FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    if args.out:
        answer.draw(image, show_proposals=args.show_proposals).save(args.out)
    if args.json:
        json.dump(answer.to_json(), sys.stdout)
        print()
    else:
        print(answer.text)
        for o in answer.objects:
            print(f"  <obj{o.index}> {o.phrase!r}: box {[round(v, 1) for v in o.box]} score {o.score:.3f}")
        for p in answer.problems:
            print(f"  note: {p}")
        if args.out:
            print(f"wrote {args.out}")
    return 0


def _ask_many(args: argparse.Namespace) -> int:
    from perceive import batch
    from perceive.cli import CliError
    from perceive.perceiver import Perceiver

    if not args.out:
        raise CliError("--images needs --out (a folder for results.jsonl, coco_results.json, pictures)")
    try:
        perceiver = Perceiver.from_pretrained(args.model)
        summary = batch.run(perceiver, args.images, args.question_flag or args.question, args.out, draw=args.draw,
                            progress=not args.json)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    if args.json:
        json.dump(summary, sys.stdout)
        print()
    else:
        print(f"{summary['answered']} answered, {summary['errors']} unreadable, "
              f"{summary['skipped_as_done']} already done; results in {args.out}")  # fmt: skip
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Parameter counts of a named configuration, built on the meta device (nothing is allocated)."""
    import torch

    from perceive.cli import CliError
    from perceive.models.configuration_perceiver import NAMED_CONFIGS, named_config
    from perceive.models.modeling_perceiver import PerceiverForRetrieval
    from perceive.models.modeling_upn import UpnModel

    if args.config not in NAMED_CONFIGS:
        raise CliError(f"unknown config {args.config!r}; known: {', '.join(NAMED_CONFIGS)}")
    cfg = named_config(args.config)
    if not cfg.obj_token_ids:  # a real tokenizer's ids; only their count matters here
        vocab = cfg.text().vocab_size
        cfg.obj_token_ids = list(range(vocab - 100, vocab))
    with torch.device("meta"):
        model = PerceiverForRetrieval(cfg)
        upn = UpnModel(cfg.upn())
    parts = {"vision (CLIP ViT)": model.vit, "vision (ConvNeXt)": model.convnext,
             "language model": model.language_model, "UPN": upn}  # fmt: skip
    projectors = sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith(("vit.", "convnext.", "language_model."))
    )
    rows = [(k, sum(p.numel() for p in m.parameters())) for k, m in parts.items()]
    rows.insert(3, ("projectors and object encoder", projectors))
    total = sum(n for _, n in rows)
    if args.json:
        json.dump({"config": args.config, **{k: n for k, n in rows}, "total": total}, sys.stdout)
        print()
        return 0
    print(
        f"config {args.config}: images {cfg.low_resolution}px (ViT) / {cfg.high_resolution}px (ConvNeXt), "
        f"layout {cfg.layout}, index head {cfg.index_head}"
    )
    for k, n in rows:
        print(f"  {k:32s} {n / 1e6:10.2f} M")
    print(f"  {'total':32s} {total / 1e6:10.2f} M")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from perceive.cli import CliError
    from perceive.serve.app import Limits, serve

    if args.queue < 1 or args.timeout <= 0 or args.max_upload_mb <= 0:
        raise CliError("--queue, --timeout and --max-upload-mb must be positive")
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), queue_size=args.queue,
                    timeout_s=args.timeout)  # fmt: skip
    try:
        serve(args.model, args.host, args.port, limits)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Index answers versus coordinates: train both, evaluate, time decoding (perceive.compare)."""
    from pathlib import Path

    from perceive import compare
    from perceive.cli import CliError
    from perceive.models.modeling_upn import UpnModel
    from perceive.perceiver import DEFAULT_MODEL

    upn_dir = Path(args.upn) if args.upn else DEFAULT_MODEL / "upn"
    if not (upn_dir / "model.safetensors").is_file():
        raise CliError(f"no trained UPN at {upn_dir} (train one with perceive train, or pass --upn)")
    cfg = compare.CompareConfig(steps=args.steps, eval_scenes=args.eval_scenes, batch_size=args.batch_size)
    report = compare.run(cfg, args.out, UpnModel.from_pretrained(str(upn_dir)), progress=not args.quiet)
    sys.stdout.write(compare.markdown(report))
    print(f"\nwrote {Path(args.out) / 'comparison.json'} and comparison.png")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="index answers versus coordinate text: train both, measure both")
    c.add_argument("--out", required=True)
    c.add_argument("--steps", type=int, default=800, help="training steps for each model")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--eval-scenes", type=int, default=60)
    c.add_argument("--upn", default=None, help="a trained UPN folder (default: checkpoints/tiny/upn)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("serve", help="a JSON API and a web page over a trained model")
    s.add_argument("--model", default=None, help="model folder (default: the shipped checkpoints/tiny)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--queue", type=int, default=8, help="requests waiting at most; more get 429")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take; then 504")
    s.add_argument("--max-upload-mb", type=float, default=10.0)
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("train", help="train a model from scratch on the synthetic world (resumes if interrupted)")
    t.add_argument("--config", default="tiny", help="training recipe: tiny (default) or smoke")
    t.add_argument("--out", required=True, help="output folder (checkpoints, logs, the final model)")
    t.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop each phase after this many steps in this run (run again to resume)",
    )
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    a = sub.add_parser("ask", help="ask a trained model about an image, or about many (--images)")
    a.add_argument("image", nargs="?")
    a.add_argument("question", nargs="?")
    a.add_argument("--question", dest="question_flag", help="the question (required with --images)")
    a.add_argument("--images", help="a folder of images or a JSONL of {image, question?, id?}: batch mode")
    a.add_argument("--draw", action="store_true", help="batch mode: also write annotated pictures")
    a.add_argument("--model", default=None, help="model folder (default: the shipped checkpoints/tiny)")
    a.add_argument("--json", action="store_true", help="print the answer (batch: the summary) as JSON")
    a.add_argument("--out", help="the annotated picture (one image) or the results folder (--images)")
    a.add_argument("--show-proposals", action="store_true", help="draw the proposal boxes too")
    a.set_defaults(func=cmd_ask)

    i = sub.add_parser("info", help="parameter counts of a named configuration (built on the meta device)")
    i.add_argument("--config", default="tiny")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
