"""Synthetic novel languages: hand-realised sentences, determinism, distinctness, consistency."""

import hashlib

from sleep_ray.data import load_stream
from sleep_ray.data.corpus import corpus_hash, pretraining_corpus
from sleep_ray.data.languages import (
    LEXICON_SIZES,
    Clause,
    Language,
    Lexicon,
    NounPhrase,
    base_corpus,
    base_language,
    english_language,
    make_languages,
    realise,
    synthetic_language_stream,
    translate_to_base,
)

TOY_LEXICON = Lexicon(
    determiners=("the",),
    adjectives=("big",),
    nouns=("dog", "cat", "park"),
    verbs=("sees",),
    adverbs=("often",),
    prepositions=("in",),
)
TOY_BASE = Language("base", TOY_LEXICON, plural_suffix="s", past_suffix="ed")
TOY_CLAUSE = Clause(
    subject=NounPhrase(determiner=0, noun=0, adjective=0),
    verb=0,
    obj=NounPhrase(determiner=0, noun=1, plural=True),
    past=True,
    adverb=0,
    preposition=0,
    prep_object=NounPhrase(determiner=0, noun=2),
)


def test_realise_base_by_hand():
    # S V O PP Adv, with plural -s on "cat" and past -ed on "sees"
    assert realise(TOY_CLAUSE, TOY_BASE) == "the big dog seesed the cats in the park often"


def test_realise_derived_rules_by_hand():
    lang = Language(
        "toy", TOY_LEXICON, clause_order="SOV", adjective_after_noun=True,
        determiner_after_noun=True, postpositions=True, adverb_first=True,
        plural_suffix="i", past_suffix="ta", object_suffix="m",
    )
    # Adv first; S = "dog big the"; O = "cat"+"i"+"m" then "the"; V = "sees"+"ta";
    # PP = "park the" + postposition "in"
    assert realise(TOY_CLAUSE, lang) == "often dog big the catim the seesta park the in"


def test_translate_to_base_record():
    lang = Language("toy", TOY_LEXICON, clause_order="VSO")
    clause = Clause(NounPhrase(0, 0), 0, NounPhrase(0, 1))
    example = translate_to_base(clause, lang, TOY_BASE, "test")
    assert example.task == "toy" and example.split == "test"
    assert example.prompt == "toy: sees the dog the cat\nbase:"
    assert example.completion == " the dog sees the cat"
    assert example.choices is None


def test_deterministic_given_seed():
    assert make_languages(3, seed=7) == make_languages(3, seed=7)
    assert synthetic_language_stream(2, 20, 5, 5, seed=7) == synthetic_language_stream(
        2, 20, 5, 5, seed=7
    )
    assert base_corpus(50, seed=7) == base_corpus(50, seed=7)
    assert base_corpus(50, seed=7) != base_corpus(50, seed=8)
    assert make_languages(2, seed=7) != make_languages(2, seed=8)


def test_language_k_does_not_depend_on_how_many():
    assert make_languages(2, seed=3) == make_languages(4, seed=3)[:2]


def test_languages_differ_from_base_and_each_other():
    base, langs = base_language(0), make_languages(4, seed=0)
    everyone = [base] + langs
    names = [lang.name for lang in everyone]
    assert len(set(names)) == len(names)
    words = [set(w for cls in LEXICON_SIZES for w in getattr(x.lexicon, cls)) for x in everyone]
    for i in range(len(words)):
        for j in range(i + 1, len(words)):
            assert not words[i] & words[j]  # no shared word forms at all
    orders = [lang.clause_order for lang in langs]
    assert "SVO" not in orders and len(set(orders)) == len(orders)


def test_lexicon_is_pronounceable_and_sized():
    base = base_language(0)
    all_words = [w for cls in LEXICON_SIZES for w in getattr(base.lexicon, cls)]
    assert 40 <= len(all_words) <= 80 and len(set(all_words)) == len(all_words)
    assert all(w.isalpha() and w.islower() and any(v in w for v in "aeiou") for w in all_words)


def _base_stems(sentence: str, lang: Language, base: Language) -> list[str]:
    """Map each word of `lang` to its base word, stripping suffixes: a bag-of-words check."""
    suffixes = {lang.plural_suffix, lang.past_suffix, lang.object_suffix,
                lang.plural_suffix + lang.object_suffix} - {""}
    table = {}
    for cls in LEXICON_SIZES:
        for own, theirs in zip(getattr(lang.lexicon, cls), getattr(base.lexicon, cls)):
            table[own] = theirs
            table.update({own + s: theirs for s in suffixes})
    return sorted(table[w] for w in sentence.split())


def test_translation_pairs_are_consistent():
    stream = synthetic_language_stream(3, 30, 5, 10, seed=0)
    base, langs = stream.meta["base"], stream.meta["languages"]
    base_table = {}
    for cls in LEXICON_SIZES:
        for w in getattr(base.lexicon, cls):
            base_table.update({w: w, w + base.plural_suffix: w, w + base.past_suffix: w})
    for task, lang in zip(stream.tasks, langs):
        assert task.name == lang.name and task.metric == "chrf"
        assert (len(task.train), len(task.val), len(task.test)) == (30, 5, 10)
        prompts = [e.prompt for e in task.train + task.val + task.test]
        assert len(set(prompts)) == len(prompts)  # no sentence repeats across splits
        for e in task.train + task.val + task.test:
            source = e.prompt.removeprefix(f"{lang.name}: ").removesuffix("\nbase:")
            target = e.completion.removeprefix(" ")
            assert len(target.split()) <= 12
            assert _base_stems(source, lang, base) == sorted(base_table[w] for w in target.split())
            assert source != target


def test_load_stream_dispatches_to_languages():
    stream = load_stream("synthetic_languages", num_languages=2, train_per_task=4,
                         val_per_task=1, test_per_task=2)
    assert stream.name == "synthetic_languages" and len(stream.tasks) == 2


def test_corpus_and_hash(tmp_path):
    lines = pretraining_corpus(20, seed=0)
    assert lines == base_corpus(20, seed=0)
    (tmp_path / "all_wiki_sents.txt").write_text("first line\n\nsecond line\n")
    with_wiki = pretraining_corpus(20, seed=0, clinc_root=tmp_path)
    assert with_wiki == lines + ["first line", "second line"]
    # the hash is sha256 of the lines JSON-quoted one per line: '"ab"\n"c"\n'
    assert corpus_hash(["ab", "c"]) == hashlib.sha256(b'"ab"\n"c"\n').hexdigest()
    assert corpus_hash(["a\nb"]) != corpus_hash(["a", "b"])  # newlines inside lines stay distinct
    assert corpus_hash(with_wiki) != corpus_hash(lines)
    skills = pretraining_corpus(20, seed=0, clinc_root=tmp_path, num_skill_lines=4)
    assert skills[:-4] == with_wiki and "\nbase: " in skills[-4] and "\nintent: " in skills[-3]


def test_realise_english_by_hand():
    english = english_language()
    # singular subject in the present: the verb takes -s; the past takes -ed whatever the number
    clause = Clause(NounPhrase(0, 0, adjective=0), 0, NounPhrase(1, 1, plural=True), adverb=2)
    assert realise(clause, english) == "the old dog helps my cats often"
    plural = Clause(NounPhrase(2, 4, plural=True), 3, NounPhrase(0, 2), past=True,
                    preposition=1, prep_object=NounPhrase(0, 8))
    assert realise(plural, english) == "our farmers painted the bird near the girl"
    assert realise(Clause(NounPhrase(2, 4, plural=True), 3, NounPhrase(0, 2)), english) \
        == "our farmers paint the bird"
    assert all(len(getattr(english.lexicon, cls)) == n for cls, n in LEXICON_SIZES.items())


def test_into_english_translates_the_same_sentences():
    base = synthetic_language_stream(2, 6, 2, 3, seed=4)
    english = synthetic_language_stream(2, 6, 2, 3, seed=4, target="english")
    for b, e in zip(base.tasks, english.tasks):
        assert b.name == e.name and e.metric == "chrf"
        for split in ("train", "val", "test"):
            for x, y in zip(getattr(b, split), getattr(e, split)):
                source = x.prompt.removesuffix("\nbase:")
                assert y.prompt == source + "\nEnglish:"  # the same sentence in the same language
                assert y.completion != x.completion and y.completion.startswith(" ")
    assert english.meta["base"].name == "English"
    cfg_stream = load_stream("synthetic_languages", num_languages=2, train_per_task=6,
                             val_per_task=2, test_per_task=3, seed=4, target="english")
    assert cfg_stream.tasks == english.tasks


def test_the_config_names_the_target_language():
    from sleep_ray.config import ConfigError, load_config
    from sleep_ray.data import stream_from_config

    cfg = load_config(None, ["data.target_language=english", "data.num_tasks=1",
                             "data.train_per_task=2", "data.val_per_task=1", "data.test_per_task=1"])
    assert stream_from_config(cfg.data).tasks[0].train[0].prompt.endswith("\nEnglish:")
    try:
        load_config(None, ["data.target_language=french"])
    except ConfigError as e:
        assert "target_language" in str(e)
    else:
        raise AssertionError("an unknown target language was accepted")
