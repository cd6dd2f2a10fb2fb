"""Procedurally generated novel languages: the continual-translation benchmark of the paper.

Owns a small base language and the languages derived from it. A sentence is first sampled as
a meaning (`Clause`: subject, verb, object, optional adverb and prepositional phrase, with
number and tense), then realised in a `Language`. Each derived language differs from the base
by (a) its own made-up lexicon, (b) word-order rules (clause order, adjective / determiner
after the noun, postpositions, adverb first) and (c) suffixes marking plural, past and the
object case. The task for language k is translating its sentences back into the base language,
so no pretrained model knows it and every language must be learned in sequence. With
`target="english"` the same sentences are translated into English instead (`english_language`:
real words, SVO, plural -s, past -ed, present -s after a singular subject), the paper's setting
for a pretrained model that knows English but none of the languages.

Everything is a pure function of the seed: Python's `random.Random` seeded with a string keyed
on what is drawn, so adding a language or sentences never changes those drawn before.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from sleep_ray.types import Example, Split, Stream, Task

ClauseOrder = Literal["SVO", "SOV", "VSO", "VOS", "OSV", "OVS"]

# Lexicon size per word class: 3 + 10 + 16 + 12 + 6 + 4 = 51 words.
LEXICON_SIZES = {
    "determiners": 3,
    "adjectives": 10,
    "nouns": 16,
    "verbs": 12,
    "adverbs": 6,
    "prepositions": 4,
}
CONSONANTS = "ptkbdgmnlrsvz"
VOWELS = "aeiou"
CODAS = "nlrs"

# Sampling rates of optional parts; they keep most sentences at 6-9 words (12 at most).
P_ADJECTIVE, P_PLURAL, P_PAST, P_ADVERB, P_PP = 0.5, 0.3, 0.4, 0.3, 0.3


@dataclass(frozen=True)
class Lexicon:
    """Surface words per word class; index i of a class is the same meaning in every language."""

    determiners: tuple[str, ...]
    adjectives: tuple[str, ...]
    nouns: tuple[str, ...]
    verbs: tuple[str, ...]
    adverbs: tuple[str, ...]
    prepositions: tuple[str, ...]


@dataclass(frozen=True)
class Language:
    """How one language turns a meaning into words.

    Suffixes are glued to the noun or verb; "" means the language does not mark that feature.
    """

    name: str
    lexicon: Lexicon
    clause_order: ClauseOrder = "SVO"
    adjective_after_noun: bool = False
    determiner_after_noun: bool = False
    postpositions: bool = False  # "the house in" instead of "in the house"
    adverb_first: bool = False  # adverb opens the sentence instead of closing it
    plural_suffix: str = ""
    past_suffix: str = ""
    object_suffix: str = ""
    agreement_suffix: str = ""  # on the verb in the present after a singular subject (English -s)


@dataclass(frozen=True)
class NounPhrase:
    """A meaning: indices into the lexicon classes, and grammatical number."""

    determiner: int
    noun: int
    adjective: int | None = None
    plural: bool = False


@dataclass(frozen=True)
class Clause:
    """A sentence meaning, independent of any language."""

    subject: NounPhrase
    verb: int
    obj: NounPhrase
    past: bool = False
    adverb: int | None = None
    preposition: int | None = None
    prep_object: NounPhrase | None = None


# ---- words -------------------------------------------------------------------------------


def pseudo_word(rng: random.Random, syllables: int) -> str:
    """A pronounceable made-up word: CV syllables and an optional final consonant ("kelum")."""
    word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))
    return word + rng.choice(CODAS) if rng.random() < 0.4 else word


def _fresh_words(rng: random.Random, count: int, syllables: tuple[int, int], taken: set) -> tuple:
    """`count` new words unused in `taken` (which grows), so no two meanings share a form."""
    words = []
    for _ in range(100 * count + 1000):  # bounded: short words run out after ~40 languages
        if len(words) == count:
            return tuple(words)
        word = pseudo_word(rng, rng.randint(*syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    raise ValueError(f"ran out of fresh {syllables}-syllable words; ask for fewer languages")


def _make_lexicon(rng: random.Random, taken: set) -> Lexicon:
    # Function words stay short (one syllable), content words take two or three, as in most
    # natural languages; it also keeps sentences short in characters for a byte-level model.
    short = {"determiners", "prepositions"}
    return Lexicon(
        **{
            cls: _fresh_words(rng, n, (1, 1) if cls in short else (2, 3), taken)
            for cls, n in LEXICON_SIZES.items()
        }
    )


def _make_suffixes(rng: random.Random, count: int) -> tuple[str, ...]:
    """Distinct suffixes: a vowel plus a consonant ("-en", "-os")."""
    pairs = [v + c for v in VOWELS for c in CODAS]
    return tuple(rng.sample(pairs, count))


# ---- languages ---------------------------------------------------------------------------


def _language_words(seed: int, num: int) -> tuple[list[Lexicon], list[str]]:
    """Lexicons for the base and `num` derived languages, plus names for the derived ones.

    One shared draw keeps every word distinct across all languages; drawing in order keeps
    language k the same whatever `num` is.
    """
    rng = random.Random(f"{seed}/words")
    taken: set[str] = {"base"}
    lexicons = [_make_lexicon(rng, taken)]
    names = []
    for _ in range(num):
        lexicons.append(_make_lexicon(rng, taken))
        names.append(_fresh_words(rng, 1, (3, 3), taken)[0])
    return lexicons, names


def base_language(seed: int = 0) -> Language:
    """The base language: SVO, adjective and determiner before the noun, prepositions."""
    lexicon = _language_words(seed, 0)[0][0]
    plural, past = _make_suffixes(random.Random(f"{seed}/base-suffixes"), 2)
    return Language("base", lexicon, plural_suffix=plural, past_suffix=past)


# English words for every meaning, index for index with the synthetic lexicons. Each takes
# its plural (nouns), past and singular present (verbs) by a bare -s / -ed, and each determiner
# fits a singular and a plural noun alike, so `realise` writes correct English.
ENGLISH_LEXICON = Lexicon(
    determiners=("the", "my", "our"),
    adjectives=("old", "young", "small", "tall", "happy", "quiet", "brave", "kind", "busy", "clever"),
    nouns=("dog", "cat", "bird", "horse", "farmer", "teacher", "doctor", "king", "girl", "boy",
           "friend", "baker", "sailor", "student", "neighbor", "driver"),
    verbs=("help", "follow", "visit", "paint", "clean", "pull", "kick", "greet", "call", "lift",
           "join", "thank"),
    adverbs=("today", "again", "often", "quietly", "slowly", "quickly"),
    prepositions=("in", "near", "behind", "with"),
)


def english_language() -> Language:
    """English as a target: SVO, adjective and determiner before the noun, prepositions, the
    adverb last, plural -s, past -ed, present -s after a singular subject."""
    return Language("English", ENGLISH_LEXICON, plural_suffix="s", past_suffix="ed",
                    agreement_suffix="s")


def _derive(
    name: str, lexicon: Lexicon, clause_order: ClauseOrder, rng: random.Random
) -> Language:
    plural, past, obj = _make_suffixes(rng, 3)
    return Language(
        name=name,
        lexicon=lexicon,
        clause_order=clause_order,
        adjective_after_noun=rng.random() < 0.5,
        determiner_after_noun=rng.random() < 0.5,
        postpositions=rng.random() < 0.5,
        adverb_first=rng.random() < 0.5,
        plural_suffix=plural,
        past_suffix=past,
        object_suffix=obj if rng.random() < 0.7 else "",
    )


def make_languages(num: int, seed: int = 0) -> list[Language]:
    """`num` novel languages derived from `base_language(seed)` (the base is not included).

    Clause orders are dealt from a seeded shuffle of the five non-SVO orders: every language
    must reorder the base, and up to five languages in a row all reorder it differently.
    """
    lexicons, names = _language_words(seed, num)
    orders: list[ClauseOrder] = ["SOV", "VSO", "VOS", "OSV", "OVS"]
    random.Random(f"{seed}/orders").shuffle(orders)
    return [
        _derive(names[k], lexicons[k + 1], orders[k % 5], random.Random(f"{seed}/rules/{k}"))
        for k in range(num)
    ]


# ---- sentences ---------------------------------------------------------------------------


def _sample_np(rng: random.Random) -> NounPhrase:
    sizes = LEXICON_SIZES
    adjective = rng.randrange(sizes["adjectives"]) if rng.random() < P_ADJECTIVE else None
    return NounPhrase(
        determiner=rng.randrange(sizes["determiners"]),
        noun=rng.randrange(sizes["nouns"]),
        adjective=adjective,
        plural=rng.random() < P_PLURAL,
    )


def sample_clause(rng: random.Random) -> Clause:
    """One random meaning; realised it has 5 to 12 words."""
    subject, verb, obj = _sample_np(rng), rng.randrange(LEXICON_SIZES["verbs"]), _sample_np(rng)
    past = rng.random() < P_PAST
    adverb = rng.randrange(LEXICON_SIZES["adverbs"]) if rng.random() < P_ADVERB else None
    if rng.random() >= P_PP:
        return Clause(subject, verb, obj, past, adverb)
    preposition = rng.randrange(LEXICON_SIZES["prepositions"])
    return Clause(subject, verb, obj, past, adverb, preposition, _sample_np(rng))


def _realise_np(np_: NounPhrase, lang: Language, case_suffix: str = "") -> list[str]:
    words = lang.lexicon
    noun = words.nouns[np_.noun] + (lang.plural_suffix if np_.plural else "") + case_suffix
    adjective = [] if np_.adjective is None else [words.adjectives[np_.adjective]]
    core = [noun] + adjective if lang.adjective_after_noun else adjective + [noun]
    det = [words.determiners[np_.determiner]]
    return core + det if lang.determiner_after_noun else det + core


def realise(clause: Clause, lang: Language) -> str:
    """The sentence that says `clause` in `lang`."""
    tense = lang.past_suffix if clause.past else "" if clause.subject.plural else lang.agreement_suffix
    parts = {
        "S": _realise_np(clause.subject, lang),
        "V": [lang.lexicon.verbs[clause.verb] + tense],
        "O": _realise_np(clause.obj, lang, lang.object_suffix),
    }
    words = [w for role in lang.clause_order for w in parts[role]]
    if clause.preposition is not None:
        prep = [lang.lexicon.prepositions[clause.preposition]]
        pp_np = _realise_np(clause.prep_object, lang)
        words += pp_np + prep if lang.postpositions else prep + pp_np
    if clause.adverb is not None:
        adverb = lang.lexicon.adverbs[clause.adverb]
        words = [adverb] + words if lang.adverb_first else words + [adverb]
    return " ".join(words)


def translate_to_base(clause: Clause, lang: Language, base: Language, split: Split) -> Example:
    """The translation task record: a sentence in `lang` -> the same meaning in the target
    `base` (the stream's base language, or English), each line named by its language."""
    return Example(
        task=lang.name,
        split=split,
        prompt=f"{lang.name}: {realise(clause, lang)}\n{base.name}:",
        completion=" " + realise(clause, base),
    )


def _distinct_clauses(rng: random.Random, count: int) -> list[Clause]:
    """`count` different meanings, so no test sentence was seen in training."""
    seen: dict[Clause, None] = {}  # a dict keeps draw order, unlike a set
    while len(seen) < count:
        seen.setdefault(sample_clause(rng), None)
    return list(seen)


def base_corpus(num_sentences: int, seed: int = 0) -> list[str]:
    """Base-language sentences for pretraining the tiny model (drawn apart from task data)."""
    base, rng = base_language(seed), random.Random(f"{seed}/corpus")
    return [realise(c, base) for c in _distinct_clauses(rng, num_sentences)]


def synthetic_language_stream(
    num_languages: int = 3,
    train_per_task: int = 400,
    val_per_task: int = 50,
    test_per_task: int = 100,
    seed: int = 0,
    target: Literal["base", "english"] = "base",
) -> Stream:
    """One translation task per novel language, in order, into the base language or English
    (the same languages and meanings either way); scored by chrF."""
    languages = make_languages(num_languages, seed)
    base = english_language() if target == "english" else base_language(seed)
    counts = {"train": train_per_task, "val": val_per_task, "test": test_per_task}
    tasks = []
    for k, lang in enumerate(languages):
        clauses = _distinct_clauses(random.Random(f"{seed}/sentences/{k}"), sum(counts.values()))
        splits, start = {}, 0
        for split, n in counts.items():
            chunk = clauses[start : start + n]
            splits[split] = tuple(translate_to_base(c, lang, base, split) for c in chunk)
            start += n
        tasks.append(Task(lang.name, splits["train"], splits["val"], splits["test"], "chrf"))
    meta = {"seed": seed, "base": base, "languages": tuple(languages)}
    return Stream("synthetic_languages", tuple(tasks), meta)
