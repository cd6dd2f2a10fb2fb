"""Write a stream of invented facts about fictional entities as a JSONL stream file.

    python benchmarks/make_facts.py --out facts.jsonl
    python benchmarks/make_facts.py --out facts_other.jsonl --kinds planet,ship,book,person \\
        --templates b --seed 1          # a stream the configs were not tuned on
    sleep-ray bench continual --config benchmarks/configs/real.yaml --stream jsonl \\
        --path facts.jsonl --methods sleep,naive_memory --output runs/facts

Each task is one entity kind (place, company, person, creature, planet, ship, book): --entities
fictional entities with --attributes attributes each, all names invented. Train: statements
("The capital of Datelin is Sarun.") and short Q/A; val and test: questions worded from the
--templates family (never a train wording), scored by accuracy over every value of that
attribute in the task (chance 1 / --entities). Deterministic from --seed; nothing is downloaded.
See sleep_ray/data/facts.py.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None):
    from sleep_ray.data.facts import DEFAULT_KINDS, KINDS, TEMPLATE_SETS

    ap = argparse.ArgumentParser(prog="make_facts.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the JSONL file to write")
    ap.add_argument("--tasks", type=int, default=4, help="number of tasks (default 4)")
    ap.add_argument("--entities", type=int, default=12,
                    help="entities per task, = candidate answers per question (default 12)")
    ap.add_argument("--attributes", type=int, default=3, help="attributes per entity (default 3)")
    ap.add_argument("--statements", type=int, default=2,
                    help="train statements per fact, distinct wordings (default 2)")
    ap.add_argument("--qa", type=int, default=1, help="train Q/A per fact (default 1)")
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                    help=f"comma list of entity kinds, one per task, cycling (of {', '.join(KINDS)};"
                         " default: all, in that order)")
    ap.add_argument("--templates", default="a", choices=sorted(TEMPLATE_SETS),
                    help="family of val/test question wordings (default a)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the names and wordings (default 0)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sleep_ray.data.facts import facts_stream, write_jsonl

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    try:
        stream = facts_stream(num_tasks=args.tasks, entities_per_task=args.entities,
                              attributes_per_entity=args.attributes,
                              statements_per_fact=args.statements, qa_per_fact=args.qa,
                              kinds=kinds, template_set=args.templates, seed=args.seed)
    except ValueError as e:
        print(f"make_facts.py: error: {e}", file=sys.stderr)
        return 2
    count = write_jsonl(stream, args.out)
    t = stream.tasks[0]
    print(f"wrote {args.out}: {count} records, {len(stream.tasks)} tasks "
          f"({', '.join(x.name for x in stream.tasks)}); per task {len(t.train)} train / "
          f"{len(t.val)} val / {len(t.test)} test; chance {1 / args.entities:.3f} "
          f"(1/{args.entities}); templates {args.templates}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
