"""Answering with box indices versus writing coordinates: the retrieval papers' central claim, measured.

Two models with the same vision encoders, language model and tokenizer (the world's words plus the
numbers 0-999) are trained on the same scenes for the same steps:

- *indices*: ChatRex's design, given the UPN's proposals (mixed with ground truth in training) and
  answering ``<ground>phrase</ground><objects><obj3><obj7></objects>``;
- *coordinates*: given no boxes, answering ``phrase [x0, y0, x1, y1], [...]`` in 0-999 bins
  (Qwen-VL style, nine tokens a box with a word-level vocabulary).

Both are then asked the same held-out detection and referring questions in crowded scenes; results
are bucketed by how many objects answer (1, 2-5, 6-10, >10): P@0.5, R@0.5 (one-to-one matching per
question) and exact-set accuracy. Decoding cost is measured by forcing answers of 1, 5, 20 and 50
objects through the same KV-cached loop at batch 1 and 16: generated tokens and time per question.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch

from perceive.eval.detection import match_one_to_one
from perceive.formats import chatrex, coords
from perceive.models.chatrex.configuration_chatrex import ChatRexConfig
from perceive.models.chatrex.modeling_chatrex import ChatRexForConditionalGeneration
from perceive.models.chatrex.perceiver_chatrex import ChatRexPerceiver
from perceive.models.chatrex.processing_chatrex import ChatRexProcessor
from perceive.models.generation import Generated, generate
from perceive.models.grammar_chatrex import ChatRexGrammar
from perceive.tokenization import build_world_tokenizer, detokenize, load_tokenizer, world_vocabulary
from perceive.train.data import WorldTasks, world_model_options
from perceive.train.trainer import Distributed, _loop, build_model
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import describe

BUCKETS = ("1", "2-5", "6-10", ">10")
HELD_OUT = 777_000
FORMATS = ("indices", "coordinates")


@dataclass
class CompareConfig:
    steps: int = 800
    batch_size: int = 16
    lr: float = 6e-4
    world: dict = field(
        default_factory=lambda: {
            "size": 256,
            "min_objects": 6,
            "max_objects": 24,
            "person_share": 0.2,
            "relation_depth": 1,
        }
    )
    tasks: dict = field(default_factory=lambda: {"detect": 1.0, "refer": 2.0})
    eval_scenes: int = 60
    decode_objects: tuple[int, ...] = (1, 5, 20, 50)
    seed: int = 0


def _bucket(n: int) -> str:
    return "1" if n <= 1 else "2-5" if n <= 5 else "6-10" if n <= 10 else ">10"


COORDINATE_WORDS = (*(str(i) for i in range(1000)), "[", "]")  # the world's own language has no brackets


def numbers_tokenizer(out: Path):
    """The world tokenizer plus the numbers 0-999 and brackets, shared by both models."""
    path = out / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        build_world_tokenizer([*world_vocabulary(), *COORDINATE_WORDS]).save_pretrained(str(path))
    tok = load_tokenizer(path)
    missing = [w for w in COORDINATE_WORDS if w not in tok.get_vocab()]
    if missing:  # a folder saved before the brackets were added: append them, existing ids unchanged
        tok.add_tokens(missing)
    return tok


def train_pair(
    cfg: CompareConfig, out: Path, upn, model_factory: Callable | None = None, progress: bool = True
) -> dict[str, ChatRexForConditionalGeneration]:
    """Train (or resume, or load) both models for ``cfg.steps`` steps on the same scenes."""
    tok = numbers_tokenizer(out)
    factory = model_factory or (lambda t: build_model("tiny", t, **world_model_options()))
    world = WorldConfig(**cfg.world)
    models = {}
    for fmt in FORMATS:
        final = out / fmt
        if (final / "model.safetensors").is_file():
            models[fmt] = ChatRexForConditionalGeneration.from_pretrained(str(final))
            continue
        torch.manual_seed(cfg.seed)
        model = factory(tok)
        processor = ChatRexProcessor(tok, cast(ChatRexConfig, model.config))
        data = WorldTasks(
            processor,
            world,
            seed=cfg.seed + 11,
            task_weights=cfg.tasks,
            upn=upn if fmt == "indices" else None,
            answer_format=fmt,
        )
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)

        def step_fn(step: int, data=data, model=model, opt=opt) -> dict[str, torch.Tensor]:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / cfg.steps))
            batch, _ = data.batch([step * cfg.batch_size + j for j in range(cfg.batch_size)])
            res = model(**batch)
            res.loss.backward()
            return {"loss": res.loss.detach(), **{k: v.detach() for k, v in res.losses.items()}}

        _loop(
            f"compare-{fmt}", out, model, opt, cfg.steps, step_fn, 100, Distributed(), progress, out / "train_log.jsonl"
        )
        model.save_pretrained(str(final))
        models[fmt] = model
    return models


def _decode(model: ChatRexForConditionalGeneration, batch: dict, tok, **options) -> list[Generated]:
    """Greedy answers of either format through the same KV-cached loop (the retrieval grammar where constrained)."""
    grammar = ChatRexGrammar(tok, model.config.text().vocab_size)
    samples = [{"num_boxes": int(n)} for n in batch["box_mask"].sum(dim=1).tolist()]
    return generate(model.begin_decoding(batch), grammar, samples, **options)


def _coordinate_boxes(text: str, size: int) -> list[list[float]]:
    parsed = coords.parse(text, units="bins")
    return [list(coords.dequantize(b.box, (size, size))) for b in parsed.boxes]


def evaluate(
    models: dict[str, ChatRexForConditionalGeneration], tok, upn, cfg: CompareConfig, progress: bool = True
) -> dict:
    """Per format and answer-size bucket: P@0.5, R@0.5, exact-set accuracy, question count."""
    from tqdm import tqdm

    world = WorldConfig(**cfg.world)
    questions: list[tuple[int, str, list[list[float]]]] = []
    scenes = [generate_scene(HELD_OUT + i, world) for i in range(cfg.eval_scenes)]
    for i, s in enumerate(scenes):
        lang = describe(s, world)
        for e in lang.expressions:
            if e.answer:
                questions.append((i, e.text, [list(s.get(o).box) for o in e.answer]))
        for cat in sorted({o.category for o in s.instances}):
            questions.append((i, cat, [list(o.box) for o in s.instances if o.category == cat]))
    from perceive.data.templates import CHATREX_TEMPLATES

    prompts = [CHATREX_TEMPLATES["detect"].format(obj=p) for _, p, _ in questions]
    preds: dict[str, list[list[list[float]]]] = {fmt: [] for fmt in FORMATS}
    retrieval = ChatRexPerceiver(models["indices"], upn, tok)
    coord_proc = ChatRexProcessor(tok, cast(ChatRexConfig, models["coordinates"].config))
    bar = tqdm(total=2 * len(questions), desc="compare", disable=not progress)
    for j in range(0, len(questions), 16):
        part = list(range(j, min(j + 16, len(questions))))
        answers = retrieval.ask_batch([scenes[questions[k][0]].image for k in part], [prompts[k] for k in part])
        preds["indices"] += [[o.box for o in a.objects] for a in answers]
        bar.update(len(part))
        batch = coord_proc.collate(
            [coord_proc.example(prompts[k], 0) for k in part], [np.zeros((0, 4))] * len(part), pad_left=True
        )
        batch.update(coord_proc.images([scenes[questions[k][0]].image for k in part])[0])
        gen = _decode(models["coordinates"].eval(), batch, tok, max_new_tokens=9 * 24 + 8, constrained=False)
        preds["coordinates"] += [
            _coordinate_boxes(detokenize(tok.convert_ids_to_tokens(g.token_ids)), world.size) for g in gen
        ]
        bar.update(len(part))
    bar.close()
    out: dict = {}
    for fmt in FORMATS:
        table = {b: {"tp": 0, "pred": 0, "gt": 0, "exact": 0, "n": 0} for b in BUCKETS}
        for (_, _, truth), pred in zip(questions, preds[fmt], strict=True):
            row = table[_bucket(len(truth))]
            m = match_one_to_one(np.array(truth), np.array(pred).reshape(-1, 4), 0.5)
            row["tp"] += m
            row["pred"] += len(pred)
            row["gt"] += len(truth)
            row["exact"] += m == len(truth) == len(pred)
            row["n"] += 1
        out[fmt] = {
            b: {
                "P@0.5": r["tp"] / r["pred"] if r["pred"] else 0.0,
                "R@0.5": r["tp"] / r["gt"] if r["gt"] else 0.0,
                "exact": r["exact"] / r["n"] if r["n"] else 0.0,
                "questions": r["n"],
            }
            for b, r in table.items()
        }
    return out


@torch.no_grad()
def decode_cost(
    models: dict[str, ChatRexForConditionalGeneration],
    tok,
    objects: tuple[int, ...] = (1, 5, 20, 50),
    batch_sizes: tuple[int, ...] = (1, 16),
    repeats: int = 3,
) -> list[dict]:
    """Tokens and seconds per question for forced answers of ``n`` objects, same loop for both formats."""
    scene = generate_scene(HELD_OUT - 1, WorldConfig(size=256))
    rng = np.random.default_rng(0)
    rows = []
    n_boxes = max(objects) + 10
    corner = rng.uniform(0, 0.5, (n_boxes, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(0.05, 0.5, (n_boxes, 2))], axis=1)  # normalised xyxy
    for fmt in FORMATS:
        model = models[fmt].eval()
        proc = ChatRexProcessor(tok, cast(ChatRexConfig, model.config))
        k = n_boxes if fmt == "indices" else 0
        for n in objects:
            if fmt == "indices":
                text = chatrex.render_groups([("circle", list(range(n)))])
            else:
                px = (boxes[:n] * 999).round().astype(int)
                text = coords.render([coords.TextBox("circle", tuple(int(v) for v in b)) for b in px])  # type: ignore[arg-type]
            forced = tok(text, add_special_tokens=False)["input_ids"]
            for bs in batch_sizes:
                batch = proc.collate([proc.example("please detect circle", k)] * bs, [boxes[:k]] * bs, pad_left=True)
                batch.update(proc.images([scene.image] * bs)[0])
                _decode(model, batch, tok, max_new_tokens=len(forced) + 1, forced=[forced] * bs)  # warm-up
                t0 = time.perf_counter()
                for _ in range(repeats):
                    _decode(model, batch, tok, max_new_tokens=len(forced) + 1, forced=[forced] * bs)
                per_q = (time.perf_counter() - t0) / repeats / bs
                rows.append(
                    {
                        "format": fmt,
                        "objects": n,
                        "batch": bs,
                        "tokens": len(forced) + 1,
                        "ms_per_question": 1000 * per_q,
                    }
                )
    return rows


def plot(results: dict, cost: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for fmt in FORMATS:
        a.plot(BUCKETS, [100 * results[fmt][k]["R@0.5"] for k in BUCKETS], marker="o", label=fmt)
        pts = [r for r in cost if r["format"] == fmt and r["batch"] == 1]
        b.plot([r["objects"] for r in pts], [r["ms_per_question"] for r in pts], marker="o", label=f"{fmt}, batch 1")
    a.set_xlabel("objects that answer the question")
    a.set_ylabel("R@0.5 (%)")
    a.set_ylim(0, 100)
    a.legend()
    b.set_xlabel("objects in the answer")
    b.set_ylabel("decode time per question (ms)")
    b.set_xscale("log")
    b.set_yscale("log")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: CompareConfig, out: str | Path, upn, model_factory: Callable | None = None, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = train_pair(cfg, out, upn, model_factory, progress)
    train_s = time.perf_counter() - t0
    tok = numbers_tokenizer(out)
    results = evaluate(models, tok, upn, cfg, progress)
    cost = decode_cost(models, tok, cfg.decode_objects)
    report = {"config": asdict(cfg), "train_seconds_both": train_s, "accuracy": results, "decode": cost}
    (out / "comparison.json").write_text(json.dumps(report, indent=2))
    plot(results, cost, out / "comparison.png")
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Trained {report['config']['steps']} steps each (batch {report['config']['batch_size']}); "
        f"{report['train_seconds_both'] / 60:.1f} min for both.",
        "",
        "| objects answering | format | questions | P@0.5 | R@0.5 | exact set |",
        "|---|---|---|---|---|---|",
    ]
    for b in BUCKETS:
        for fmt in FORMATS:
            r = report["accuracy"][fmt][b]
            lines.append(
                f"| {b} | {fmt} | {r['questions']} | {100 * r['P@0.5']:.1f} | {100 * r['R@0.5']:.1f} | "
                f"{100 * r['exact']:.1f} |"
            )
    lines += [
        "",
        "| objects in answer | batch | index tokens | index ms/question | coordinate tokens | coordinate ms/question |",
        "|---|---|---|---|---|---|",
    ]
    cost = report["decode"]
    for r in (x for x in cost if x["format"] == "indices"):
        c = next(
            x
            for x in cost
            if x["format"] == "coordinates" and x["objects"] == r["objects"] and x["batch"] == r["batch"]
        )
        lines.append(
            f"| {r['objects']} | {r['batch']} | {r['tokens']} | {r['ms_per_question']:.1f} | {c['tokens']} | "
            f"{c['ms_per_question']:.1f} |"
        )
    return "\n".join(lines) + "\n"
