"""Tokenizers: the word-level one the tiny models use, built over the world's vocabulary, and the
special tokens every perceive model adds to its vocabulary (tiny or real).

The world tokenizer is a ``tokenizers`` WordLevel model (lower case, split on spaces and
punctuation) wrapped in ``PreTrainedTokenizerFast``, so it saves and loads like any Hugging Face
tokenizer. Real configurations load the user's tokenizer folder and get the same special tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

MAX_OBJECTS = 100
OBJ_TOKENS = tuple(f"<obj{k}>" for k in range(MAX_OBJECTS))
IMAGE, ROI = "<image>", "<roi>"
GROUND_OPEN, GROUND_CLOSE = "<ground>", "</ground>"
OBJECTS_OPEN, OBJECTS_CLOSE = "<objects>", "</objects>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"
SPECIAL_TOKENS = (IMAGE, ROI, GROUND_OPEN, GROUND_CLOSE, OBJECTS_OPEN, OBJECTS_CLOSE, USER, ASSISTANT, *OBJ_TOKENS)
_NO_SPACE_BEFORE = set(".,;:?!')")
# a tokenizer's vocabulary: the fast one every saved tokenizer has, or a real model's slow one
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in (*SPECIAL_TOKENS, PAD, UNK, EOS)))


def words_of(texts: Iterable[str]) -> list[str]:
    """The words of ``texts`` and of the task templates, as the word-level tokenizer splits them: its vocabulary
    for a dataset."""
    from tokenizers import pre_tokenizers

    from perceive.data.templates import CHATREX_TEMPLATES

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words: set[str] = set(str(i) for i in range(0, 101))
    for text in (*CHATREX_TEMPLATES.values(), "There are None", "yes no nothing nobody", *texts):
        for piece in _SPECIAL_RE.split(text.lower()):
            words.update(w for w, _ in pre.pre_tokenize_str(piece))
    return sorted(words)


def world_vocabulary(n_scenes: int = 300) -> list[str]:
    """Every word the world's language and the task templates use, found by generating them."""
    from perceive.world.generator import WorldConfig, generate_scene
    from perceive.world.language import describe
    from perceive.world.scene import ITEMS, PARTS, SHAPES

    texts: list[str] = [*SHAPES, *ITEMS, *PARTS]  # the world's names, asked about even when absent
    cfg = WorldConfig(size=128, person_share=0.4, relation_depth=2)
    for seed in range(n_scenes):
        lang = describe(generate_scene(seed, cfg), cfg)
        texts += [e.text for e in lang.expressions] + [c.text for c in lang.captions]
        texts += [t for r in lang.regions for t in (r.category, r.short_phrase, r.brief, r.referring or "")]
        texts += [t for q in lang.questions for t in (q.question, q.answer)]
        texts += [t for vp in lang.visual_prompts for t in (vp.question, vp.answer)]
    return words_of(texts)


def build_world_tokenizer(words: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab_words = list(words) if words is not None else world_vocabulary()
    vocab = {t: i for i, t in enumerate([PAD, UNK, EOS])}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=EOS)
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer folder (the world's or a real model's), with perceive's special tokens added. A folder
    without one, or whose files do not load, is a ``FileNotFoundError`` or ``ModelFolderError`` naming it."""
    from perceive.models.folder_checks import one_line, read_json_object
    from perceive.perceiver import ModelFolderError

    p = Path(path)
    config = p / "tokenizer_config.json"
    vocabulary = next((p / f for f in VOCABULARY_FILES if (p / f).is_file()), None)
    if vocabulary is None:
        raise FileNotFoundError(f"{p} has no tokenizer (tokenizer.json)")
    if not config.is_file():
        raise FileNotFoundError(f"{p} has no tokenizer settings (tokenizer_config.json)")
    settings = read_json_object(config)
    world = settings.get("tokenizer_class") in ("PreTrainedTokenizerFast", "TokenizersBackend")
    if world and vocabulary.name != "tokenizer.json":
        raise FileNotFoundError(f"{p} has no tokenizer (tokenizer.json)")
    try:
        # loaded by the class the settings name (transformers' own; no code from the folder): AutoTokenizer would read
        # the model's config.json, which is perceive's, not the tokenizer's
        named = None if world else tokenizer_class_from_name(str(settings.get("tokenizer_class") or ""))
        tok = (PreTrainedTokenizerFast if world else named or AutoTokenizer).from_pretrained(str(p))
    except Exception as e:  # the tokenizers library raises bare Exceptions for a malformed file
        raise ModelFolderError(f"{vocabulary} is not a tokenizer that loads: {one_line(e)}") from None
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or UNK
    return tok


def add_tokens(tokenizer, tokens: Iterable[str]) -> None:
    """Add those of ``tokens`` that ``tokenizer`` does not spell as one token (a model's markup, and the choices its
    grammar reads as one token), as special tokens."""
    missing = [t for t in tokens if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)


def is_word_level(tokenizer) -> bool:
    """Whether ``tokenizer`` is perceive's word-level one (a real model's is a BPE or another subword model)."""
    from tokenizers.models import WordLevel

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and isinstance(backend.model, WordLevel)


def decode_text(tokenizer, ids: Iterable[int]) -> str:
    """Generated token ids as text: the word-level tokenizer's words joined by ``detokenize``, a real tokenizer's
    decoded as it decodes itself; the end and padding tokens are dropped."""
    ids = list(ids)
    if is_word_level(tokenizer):
        return detokenize(tokenizer.convert_ids_to_tokens(ids))
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return tokenizer.decode([i for i in ids if i not in ends], skip_special_tokens=False)


def detokenize(tokens: Iterable[str]) -> str:
    """Join word-level tokens back into text: words are spaced, punctuation and markup are glued
    (``with <ground>a cup</ground><objects><obj3></objects>.``), and a group that directly follows
    another starts a new line, as ChatRex prints detection answers."""
    out = ""
    prev = ""
    in_objects = False
    for t in tokens:
        if t in (PAD, EOS):
            continue
        if t == OBJECTS_OPEN:
            in_objects = True
        glue = (
            not out
            or in_objects
            or t in (GROUND_CLOSE, OBJECTS_OPEN, OBJECTS_CLOSE)
            or prev in (GROUND_OPEN, "'")
            or t[:1] in _NO_SPACE_BEFORE
            or out.endswith(("(", "\n"))
        )
        if t == GROUND_OPEN and prev == OBJECTS_CLOSE:
            out += "\n"
            glue = True
        if in_objects and t == "none":
            t = "None"  # RexSeek's spelling of an empty answer; the word-level vocabulary is lower case
        out += t if glue else " " + t
        if t == OBJECTS_CLOSE:
            in_objects = False
        prev = t
    return out
