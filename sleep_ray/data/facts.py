"""Invented facts about fictional entities: the knowledge-incorporation stream, made offline.

Each task is one entity *kind* (places, companies, people, creatures, planets, ships, books):
N fictional entities, each with A attributes whose values are invented names ("The capital of
Datelin is Sarun."). Nothing here is a fact a pretrained model can know, and nothing is
downloaded.

- train: statements (`prompt: ""`, `completion: "The capital of Datelin is Sarun."`, several
  statement templates per fact) and short Q/A (`prompt: "Q: What is the capital of
  Datelin?\\nA:"`, `completion: " Sarun"`), worded from `TRAIN_STATEMENTS` / `TRAIN_QA`;
- val and test: questions worded from one of the disjoint `TEMPLATE_SETS` (never a train
  wording; val and test wordings differ from each other too), `completion: " Sarun"`,
  `choices`: every value of that attribute in the task, sorted (chance = 1/N).

Names are syllable-built (consonant-vowel syllables with a final consonant, capitalised), unique
across the whole stream, prefix-free (no name begins another, so a candidate answer is never
the start of another), and never one of the English words in `_ENGLISH` (every word of a
30,000-word English vocabulary that fits the name shapes). Everything is a pure function of the
arguments: `random.Random` seeded with a string, so a stream is the same on every machine.

A stream the benchmark configs were not tuned on: other `kinds`, another `template_set`, another
`seed`. `write_jsonl` writes the format of `sleep_ray.data.jsonl`;
`benchmarks/make_facts.py` is the command line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sleep_ray.types import Example, Stream, Task


@dataclass(frozen=True)
class Attribute:
    """One attribute of a kind. `name` reads in "the {name} of X"; `cls` names what the value is
    ("Which {cls} ..."); `wh` is the question word of the train Q/A ("What" / "Who")."""

    name: str
    cls: str
    wh: str = "What"


@dataclass(frozen=True)
class Kind:
    name: str
    poss: str  # possessive pronoun of an entity: "its", "their"
    attributes: tuple[Attribute, ...]


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("place", "its", (Attribute("capital", "city"), Attribute("longest river", "river"),
                          Attribute("founder", "person", "Who"),
                          Attribute("national dish", "dish"))),
    Kind("company", "its", (Attribute("founder", "person", "Who"),
                            Attribute("headquarters", "city"),
                            Attribute("flagship product", "product"),
                            Attribute("chief engineer", "engineer", "Who"))),
    Kind("person", "their", (Attribute("birthplace", "town"),
                             Attribute("favourite instrument", "instrument"),
                             Attribute("pet", "animal"), Attribute("mentor", "teacher", "Who"))),
    Kind("creature", "its", (Attribute("habitat", "forest"), Attribute("favourite food", "plant"),
                             Attribute("main predator", "beast"),
                             Attribute("discoverer", "explorer", "Who"))),
    Kind("planet", "its", (Attribute("home star", "star"), Attribute("largest moon", "moon"),
                           Attribute("discoverer", "astronomer", "Who"),
                           Attribute("largest city", "city"))),
    Kind("ship", "its", (Attribute("captain", "sailor", "Who"), Attribute("home port", "port"),
                         Attribute("builder", "shipyard"),
                         Attribute("first destination", "island"))),
    Kind("book", "its", (Attribute("author", "writer", "Who"),
                         Attribute("hero", "character", "Who"), Attribute("setting", "city"),
                         Attribute("publisher", "company"))),
)}
DEFAULT_KINDS = tuple(KINDS)  # task i gets DEFAULT_KINDS[i % 7]: a different kind per task

# Slots: {e} entity, {v} value, {attr} attribute name ({Attr} capitalised), {cls} what the value
# is, {a_cls} with its article, {wh} "What" / "Who", {poss} "its" / "their" ({Poss}).
TRAIN_STATEMENTS = (
    "The {attr} of {e} is {v}.",
    "{e}'s {attr} is {v}.",
    "{v} is the {attr} of {e}.",
    "As for {e}, {poss} {attr} is {v}.",
)
TRAIN_QA = (
    "Q: {wh} is the {attr} of {e}?\nA:",
    "Q: {wh} is {e}'s {attr}?\nA:",
    "Q: Tell me the {attr} of {e}.\nA:",
)


@dataclass(frozen=True)
class TemplateSet:
    """Held-out question wordings: `val` and `test` (prompts; the completion is " {v}")."""

    val: tuple[str, ...]
    test: tuple[str, ...]


TEMPLATE_SETS: dict[str, TemplateSet] = {
    # "a": the default family.
    "a": TemplateSet(
        val=("Q: Which {cls} serves as the {attr} of {e}?\nA:",
             "Q: Which {cls} is {e}'s {attr}?\nA:"),
        test=("The {cls} that {e} has as {poss} {attr} is called",
              "Q: {e} has which {cls} as {poss} {attr}?\nA:"),
    ),
    # "b": other wordings, for a stream the configs were not tuned on.
    "b": TemplateSet(
        val=("Question: Which {cls} do people mean when they speak of the {attr} of {e}?\n"
             "Answer:",
             "Question: If someone asks about {e}, which {cls} is {poss} {attr}?\nAnswer:"),
        test=("Encyclopedia entry: {e}. {Attr}:",
              "In a list of facts about {e}, the {attr} is given as"),
    ),
    # "c": a third family (quiz and fill-in forms).
    "c": TemplateSet(
        val=("Quiz. {e}: what {cls} is {poss} {attr}? Answer:",
             "Trivia about {e}. {Poss} {attr}, {a_cls}, goes by the name"),
        test=("Fill in the blank. {e}'s {attr}: ___. Answer:",
              "Known facts, {e}. The {cls} holding the role of {attr} is named"),
    ),
}

# Name shapes: entities CV-CV-CV-C ("Datelin"), values CV-CV-C ("Sarun").
_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CODAS = "nlrk"
_ENTITY_SYLLABLES, _VALUE_SYLLABLES = 3, 2

# Every word of the all-MiniLM-L6-v2 (BERT uncased) vocabulary, 21,945 lowercase alphabetic
# entries, that fits a name shape above: a generated name is never one of them.
_ENGLISH = frozenset("""
later never began river final given level total taken seven peter model medal novel roman paper
metal legal rural super minor latin label naval simon begin labor kevin motor roger begun favor
demon sugar baron robin solar panel tamil baker susan logan basin dozen refer rival devil mason
tiger manor milan lover moral radar derek devon ruler rider karen nepal meter rebel vital fever
laser maker gavin tenor kumar raven sudan nobel fatal loser salon pupil liner liver damon polar
poker fiber lunar piper papal baden ramon megan nigel nolan viral rover tumor turin safer risen
dover basel voter pagan malik lemon basil laden motel tutor donor tidal razor sedan basal baton
mural tudor diner pedal lever mater nagar marin titan satan niger regan sober natal lenin linen
luton diver moran viper penal miner ronan pavel rotor feral talon rumor nasal token satin ruben
mabel siren novak timor lamar vapor levin patel rubin galen kabul benin regal luzon rosen faber
kamal kazan putin kamen bison kiran duran gabon taluk devin liter duval vigor paler karin resin
sonar menon renal timer saber fetal libel laval leger finer vogel valor barak gamer karel musik
tobin deter goran loren seton biker tatar ronin
several general similar popular federal natural regular manager digital liberal forever senator
revival funeral madison veteran monitor deliver removal lebanon solomon mineral minimal visitor
lateral tibetan donovan titular refusal nominal senegal taliban vitamin seminar foreman baseman
literal modular pivotal pokemon seminal moniker dunedin bolivar kaladin marital lineman tubular
salazar donegal federer malabar vinegar bipolar
""".split())


def _name(rng: random.Random, syllables: int) -> str:
    body = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (body + rng.choice(_CODAS)).capitalize()


class _Names:
    """Draws names unique and prefix-free across one stream, never an English word."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: list[str] = []  # lowercase

    def _clashes(self, low: str) -> bool:
        return low in _ENGLISH or any(u.startswith(low) or low.startswith(u) for u in self.used)

    def draw(self, syllables: int) -> str:
        for _ in range(10_000):
            name = _name(self.rng, syllables)
            if not self._clashes(name.lower()):
                self.used.append(name.lower())
                return name
        raise ValueError("ran out of fictional names: ask for fewer tasks or entities")


def _slots(kind: Kind, attr: Attribute, entity: str, value: str) -> dict[str, str]:
    article = "an" if attr.cls[0] in "aeiou" else "a"
    return {"e": entity, "v": value, "attr": attr.name, "Attr": attr.name[0].upper() + attr.name[1:],
            "cls": attr.cls, "a_cls": f"{article} {attr.cls}", "wh": attr.wh, "poss": kind.poss,
            "Poss": kind.poss.capitalize()}


def _check_count(what: str, n: int, low: int, high: int) -> None:
    if not low <= n <= high:
        raise ValueError(f"{what}={n}: must be between {low} and {high}")


def facts_stream(num_tasks: int = 4, entities_per_task: int = 12, attributes_per_entity: int = 3,
                 statements_per_fact: int = 2, qa_per_fact: int = 1, val_per_fact: int = 1,
                 test_per_fact: int = 1, kinds: Sequence[str] | None = None,
                 template_set: str = "a", seed: int = 0) -> Stream:
    """A stream of `num_tasks` invented-fact tasks.

    Task i has `entities_per_task` entities of kind `kinds[i % len(kinds)]` (default: the kinds
    of `DEFAULT_KINDS` in order, a different one per task), each with the kind's first
    `attributes_per_entity` attributes. Per fact (entity, attribute): `statements_per_fact`
    train statements and `qa_per_fact` train Q/A (distinct train templates), `val_per_fact` val
    and `test_per_fact` test questions worded from `TEMPLATE_SETS[template_set]`.
    Train records are shuffled; val and test are in (entity, attribute) order.
    """
    kinds = tuple(kinds) if kinds else DEFAULT_KINDS
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"kinds={list(kinds)}: unknown {unknown}; expected some of {list(KINDS)}")
    if template_set not in TEMPLATE_SETS:
        raise ValueError(f"template_set={template_set!r}: expected one of {list(TEMPLATE_SETS)}")
    templates = TEMPLATE_SETS[template_set]
    _check_count("num_tasks", num_tasks, 1, 1000)
    _check_count("entities_per_task", entities_per_task, 2, 1000)
    _check_count("attributes_per_entity", attributes_per_entity, 1,
                 min(len(KINDS[k].attributes) for k in kinds))
    _check_count("statements_per_fact", statements_per_fact, 0, len(TRAIN_STATEMENTS))
    _check_count("qa_per_fact", qa_per_fact, 0, len(TRAIN_QA))
    if statements_per_fact + qa_per_fact == 0:
        raise ValueError("statements_per_fact + qa_per_fact = 0: the tasks would have no train split")
    _check_count("val_per_fact", val_per_fact, 0, len(templates.val))
    _check_count("test_per_fact", test_per_fact, 1, len(templates.test))

    names = _Names(random.Random(f"facts-names:{seed}"))
    tasks = []
    for t in range(num_tasks):
        kind = KINDS[kinds[t % len(kinds)]]
        attrs = kind.attributes[:attributes_per_entity]
        entities = [names.draw(_ENTITY_SYLLABLES) for _ in range(entities_per_task)]
        values = [[names.draw(_VALUE_SYLLABLES) for _ in attrs] for _ in entities]
        task_name = f"facts{t + 1}_{kind.name}"
        rng = random.Random(f"facts-templates:{seed}:{t}")
        train, val, test = [], [], []
        choices = [tuple(sorted(" " + values[i][a] for i in range(len(entities))))
                   for a in range(len(attrs))]
        for i, entity in enumerate(entities):
            for a, attr in enumerate(attrs):
                s = _slots(kind, attr, entity, values[i][a])
                answer = " " + values[i][a]
                for tpl in rng.sample(TRAIN_STATEMENTS, statements_per_fact):
                    train.append(Example(task_name, "train", "", tpl.format(**s)))
                for tpl in rng.sample(TRAIN_QA, qa_per_fact):
                    train.append(Example(task_name, "train", tpl.format(**s), answer))
                # Alternate the held-out wordings over facts so that each one is used.
                k = i + a
                for j in range(val_per_fact):
                    tpl = templates.val[(k + j) % len(templates.val)]
                    val.append(Example(task_name, "val", tpl.format(**s), answer, choices[a]))
                for j in range(test_per_fact):
                    tpl = templates.test[(k + j) % len(templates.test)]
                    test.append(Example(task_name, "test", tpl.format(**s), answer, choices[a]))
        rng.shuffle(train)
        tasks.append(Task(task_name, tuple(train), tuple(val), tuple(test), "accuracy"))
    meta = {"generator": "facts", "seed": seed, "kinds": [KINDS[kinds[t % len(kinds)]].name
                                                          for t in range(num_tasks)],
            "template_set": template_set, "entities_per_task": entities_per_task,
            "attributes_per_entity": attributes_per_entity, "chance": 1 / entities_per_task}
    return Stream("facts", tuple(tasks), meta)


def stream_records(stream: Stream):
    """The JSONL records of `stream`, task by task, train then val then test."""
    for task in stream.tasks:
        for ex in (*task.train, *task.val, *task.test):
            record = {"task": ex.task, "split": ex.split, "prompt": ex.prompt,
                      "completion": ex.completion}
            if ex.choices is not None:
                record["choices"] = list(ex.choices)
            yield record


def write_jsonl(stream: Stream, path: str | Path) -> int:
    """Write `stream` in the format of `sleep_ray.data.jsonl`; return the number of records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for record in stream_records(stream):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
