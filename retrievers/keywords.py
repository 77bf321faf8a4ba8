"""Keyword terms for full-text search in any script: words where text has spaces, character
bigrams where it has none.

SQLite's FTS5 tokenizers split on spaces and punctuation, so a Japanese sentence is one
token and a search for 東京 in "東京タワーに行った" finds nothing. memlayer therefore indexes a
derived keyword string instead of the raw text: Latin, Cyrillic, Greek and other spaced
scripts become lower-cased words with their accents removed ("Café" → "cafe"), and runs of
Chinese, Japanese, Korean, Thai, Lao, Khmer or Myanmar characters become overlapping
character bigrams (the usual CJK analysis; a single character stands alone). A query goes
through the same function, and each query word becomes a phrase of its bigrams, so a
two-character word matches exactly where it occurs and longer ones match in order.
"""

from __future__ import annotations

import re
import unicodedata

_PIECES = re.compile(r"[^\W_]+|.", re.DOTALL)  # a run of letters and digits, or one other character
_ACCENTS = re.compile("[\u0300-\u036f]")  # the combining diacritics NFKD splits off letters
# Scripts written without spaces between words: CJK ideographs and their extensions,
# kana, Hangul, Thai, Lao, Khmer, Myanmar.
_UNSPACED = re.compile(
    "["
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"  # Hangul
    "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"  # kana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\U00020000-\U0003134f"
    "]+"
)


def fold(text: str) -> str:
    """Case-fold, unify compatibility forms and strip the accents of Latin, Greek and Cyrillic
    letters; marks of other scripts (Thai vowels, Devanagari signs) and Hangul syllables stay."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return unicodedata.normalize("NFC", _ACCENTS.sub("", decomposed))


def _words(text: str) -> list[str]:
    """Runs of letters, digits and combining marks (Thai vowels and Devanagari signs are marks,
    which `\\w` alone would cut words at); everything else separates, as in FTS5's unicode61."""
    words: list[str] = []
    current = ""
    for piece in _PIECES.findall(text):
        if piece[0].isalnum() or unicodedata.category(piece).startswith("M"):
            current += piece
        elif current:
            words.append(current)
            current = ""
    return [*words, current] if current else words


def term_groups(text: str) -> list[list[str]]:
    """The terms of each word of `text`: [word] for spaced scripts, its bigrams otherwise.

    A word mixing scripts ("iPhone機種") splits at the script boundary.
    """
    groups: list[list[str]] = []
    for word in _words(fold(text)):
        position = 0
        for run in _UNSPACED.finditer(word):
            if run.start() > position:
                groups.append([word[position : run.start()]])
            groups.append(_bigrams(run.group()))
            position = run.end()
        if position < len(word):
            groups.append([word[position:]])
    return groups


def index_text(text: str) -> str:
    """The keyword string stored for full-text indexing: every term, space-separated."""
    return " ".join(term for group in term_groups(text) for term in group)


def match_query(text: str) -> str | None:
    """An FTS5 MATCH expression: any word of `text`, each word's terms as one phrase.

    None when the text has no word at all.
    """
    phrases = {'"' + " ".join(group) + '"' for group in term_groups(text)}
    return " OR ".join(sorted(phrases)) if phrases else None


def _bigrams(run: str) -> list[str]:
    if len(run) == 1:
        return [run]
    return [run[i : i + 2] for i in range(len(run) - 1)]
