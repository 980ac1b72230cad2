"""Salient query words for Stage 2, without downloading anything.

The reference finds salient words with spaCy + NLTK: question words and `? ! :` always; other words only if
they are not stop words and are nouns, proper nouns, pronouns, verbs, adjectives or adverbs. Here the
NLTK English stop-word list is built in; the part-of-speech filter is applied when spaCy and its
`en_core_web_sm` model happen to be installed (`pip install duet-export[spacy]` plus the model), and
otherwise every non-stop word counts as content. Numbers are content words here (the reference's POS set
drops them; "row 2, column 3" needs them).
"""

from __future__ import annotations

import functools
import re

__all__ = ["QUESTION_WORDS", "STOP_WORDS", "salient_spans", "salient_words", "token_mask_from_spans"]

QUESTION_WORDS = frozenset({"who", "what", "where", "when", "why", "how", "which", "whom", "whose"})
KEPT_PUNCTUATION = frozenset({"?", "!", ":"})
_CONTENT_POS = frozenset({"NOUN", "PROPN", "PRON", "VERB", "ADJ", "ADV", "NUM"})

# NLTK's English stop words (nltk.corpus.stopwords.words("english"), 179 words).
STOP_WORDS = frozenset(
    [
        "i",
        "me",
        "my",
        "myself",
        "we",
        "our",
        "ours",
        "ourselves",
        "you",
        "you're",
        "you've",
        "you'll",
        "you'd",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "he",
        "him",
        "his",
        "himself",
        "she",
        "she's",
        "her",
        "hers",
        "herself",
        "it",
        "it's",
        "its",
        "itself",
        "they",
        "them",
        "their",
        "theirs",
        "themselves",
        "what",
        "which",
        "who",
        "whom",
        "this",
        "that",
        "that'll",
        "these",
        "those",
        "am",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "have",
        "has",
        "had",
        "having",
        "do",
        "does",
        "did",
        "doing",
        "a",
        "an",
        "the",
        "and",
        "but",
        "if",
        "or",
        "because",
        "as",
        "until",
        "while",
        "of",
        "at",
        "by",
        "for",
        "with",
        "about",
        "against",
        "between",
        "into",
        "through",
        "during",
        "before",
        "after",
        "above",
        "below",
        "to",
        "from",
        "up",
        "down",
        "in",
        "out",
        "on",
        "off",
        "over",
        "under",
        "again",
        "further",
        "then",
        "once",
        "here",
        "there",
        "when",
        "where",
        "why",
        "how",
        "all",
        "any",
        "both",
        "each",
        "few",
        "more",
        "most",
        "other",
        "some",
        "such",
        "no",
        "nor",
        "not",
        "only",
        "own",
        "same",
        "so",
        "than",
        "too",
        "very",
        "s",
        "t",
        "can",
        "will",
        "just",
        "don",
        "don't",
        "should",
        "should've",
        "now",
        "d",
        "ll",
        "m",
        "o",
        "re",
        "ve",
        "y",
        "ain",
        "aren",
        "aren't",
        "couldn",
        "couldn't",
        "didn",
        "didn't",
        "doesn",
        "doesn't",
        "hadn",
        "hadn't",
        "hasn",
        "hasn't",
        "haven",
        "haven't",
        "isn",
        "isn't",
        "ma",
        "mightn",
        "mightn't",
        "mustn",
        "mustn't",
        "needn",
        "needn't",
        "shan",
        "shan't",
        "shouldn",
        "shouldn't",
        "wasn",
        "wasn't",
        "weren",
        "weren't",
        "won",
        "won't",
        "wouldn",
        "wouldn't",
    ]
)

_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


@functools.lru_cache(maxsize=1)
def _spacy():
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except Exception:  # spaCy or its model is not installed: the stop-word rule alone applies
        return None


def _keep(word: str, pos: str | None) -> bool:
    lower = word.lower()
    if lower in QUESTION_WORDS or word in KEPT_PUNCTUATION:
        return True
    if lower in STOP_WORDS or not re.match(r"\w", word):
        return False
    return pos is None or pos in _CONTENT_POS


def salient_spans(text: str, use_spacy: bool = True) -> list[tuple[int, int]]:
    """Character spans of the salient words of `text` (the user's question)."""
    nlp = _spacy() if use_spacy else None
    if nlp is not None:
        return [(t.idx, t.idx + len(t.text)) for t in nlp(text) if _keep(t.text, t.pos_)]
    return [(m.start(), m.end()) for m in _WORD.finditer(text) if _keep(m.group(), None)]


def salient_words(text: str, use_spacy: bool = True) -> list[str]:
    return [text[a:b] for a, b in salient_spans(text, use_spacy)]


def token_mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Mark each token (given by its character offsets) that overlaps a salient span."""
    out = []
    for start, end in offsets:
        out.append(end > start and any(start < b and a < end for a, b in spans))
    return out
