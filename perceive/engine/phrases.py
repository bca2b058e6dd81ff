"""Noun phrases of a caption, and the filter that drops abstract ones (ChatRex Sec. 4.1: SpaCy's noun phrases,
"filter out some abstract nouns that might not be an object like image, background etc.").

A captioner that grounds its own caption (ChatRex's grounded brief caption) marks its noun phrases itself; those
spans are used as they are. A plain caption is cut into phrases by ``chunk``, a small rule of English: a phrase
is a run of words between punctuation and closed-class words (verbs of being and having, prepositions,
conjunctions, pronouns). It keeps no prepositional attachments ("a person in a green shirt" gives "a person" and
"a green shirt", as SpaCy's noun chunks do). With SpaCy and an English model installed, ``SpacyPhrases`` is the
paper's own extractor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


# nouns that name no object one could box (the paper's "image, background etc."), by their last word
ABSTRACT_NOUNS = _word_set(
    """image picture photo photograph shot scene view background foreground setting atmosphere
    left right top bottom middle center centre corner side edge front back area part portion
    color colour shape pattern texture style lighting moment time day detail"""
)
# closed-class words that end a noun phrase (a phrase never starts or continues through one)
_BREAKS = _word_set(
    """is are was were be been being am has have had do does did can could will would shall should may might must
    shows show showing shown depicts depicting features featuring contains containing there here
    and or but nor while which that who whom whose where when as than then also
    of in on at with without near next to from by above below under over behind beside besides between among
    around across along into onto upon toward towards for against beneath through within
    it its they them their this these those he she his her him we us our you your i me my"""
)
_DETERMINERS = _word_set("a an the some many several few each every any all no one two three four five")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|[0-9]+|[^\sA-Za-z0-9]")


@dataclass(frozen=True)
class Phrase:
    text: str
    span: tuple[int, int]  # [start, end) in the caption


def head_noun(phrase: str) -> str:
    """The last word of a phrase, lower-cased and without a plural 's' (a crude English singular)."""
    words = re.findall(r"[a-z][a-z'-]*", phrase.lower())
    return singular(words[-1]) if words else ""


_IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "feet": "foot",
              "teeth": "tooth", "mice": "mouse", "geese": "goose", "knives": "knife", "leaves": "leaf"}  # fmt: skip


def singular(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    return word


def is_abstract(phrase: str) -> bool:
    return head_noun(phrase) in ABSTRACT_NOUNS


def chunk(text: str) -> list[Phrase]:
    """The noun phrases of a plain caption by the rule above, in order; a run of determiners alone is none."""
    phrases: list[Phrase] = []
    run: list[re.Match] = []

    def close() -> None:
        words = list(run)
        while words and words[-1][0].lower() in _DETERMINERS:  # "... of the" cut short: no noun
            words.pop()
        if any(m[0].lower() not in _DETERMINERS for m in words):
            start, end = words[0].start(), words[-1].end()
            phrases.append(Phrase(text[start:end], (start, end)))
        run.clear()

    for m in _WORD.finditer(text):
        token = m[0]
        if not token[0].isalnum() or token.lower() in _BREAKS:
            close()
        else:
            run.append(m)
    close()
    return phrases


class SpacyPhrases:
    """SpaCy's noun chunks, as the paper extracts them (needs ``spacy`` and a model such as ``en_core_web_sm``
    installed locally; nothing is downloaded)."""

    def __init__(self, model: str = "en_core_web_sm") -> None:
        try:
            import spacy
        except ImportError as e:
            raise ImportError("SpacyPhrases needs spacy and an English model installed (pip install spacy)") from e
        self.nlp = spacy.load(model)

    def __call__(self, text: str) -> list[Phrase]:
        return [Phrase(c.text, (c.start_char, c.end_char)) for c in self.nlp(text).noun_chunks]
