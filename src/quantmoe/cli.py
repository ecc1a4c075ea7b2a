"""The ``quantmoe`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from quantmoe.allocator import bound_kernel_caches, tune_malloc

log = logging.getLogger("quantmoe")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from quantmoe.anatomy import format_anatomy
    from quantmoe.anatomy.describe import inspect_model
    from quantmoe.models import resolve_model, source_config
    from quantmoe.multimodal import multimodal_of

    source = resolve_model(args.model)
    wrapper = multimodal_of(source_config(source, trust_remote_code=args.trust_remote_code))
    if wrapper is not None:
        print(f"a multimodal {wrapper.display_name} checkpoint ({wrapper.model_type}): its text model below, "
              "the vision tower not counted")
    print(format_anatomy(inspect_model(source, trust_remote_code=args.trust_remote_code)))
    return 0


def _cmd_families(args: argparse.Namespace) -> int:
    from quantmoe.anatomy.catalog import family_rows, family_table_markdown

    if args.markdown:
        sys.stdout.write(family_table_markdown())
        return 0
    rows = family_rows()
    for row in rows:
        detail = row.roles if row.status == "refused" else row.name
        print(f"{row.model_type:<22} {row.status:<12} {detail}")
    counts = {s: sum(r.status == s for r in rows) for s in ("supported", "shapes only", "text model", "refused")}
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


def _eval_tokenizer(name: str, tokenizer: str | None, trust_remote_code: bool):
    """The folder of ``name`` and its tokenizer, without loading the model (``--stream``)."""
    from transformers import AutoTokenizer

    from quantmoe.models import _check_tokenizer_files, quantized_format, read_model_config, resolve_model
    from quantmoe.quant.cli import model_folder

    folder = model_folder(name)
    tok_path = resolve_model(tokenizer) if tokenizer else str(folder)
    _check_tokenizer_files(str(folder), tok_path if tokenizer else None)
    config = read_model_config(folder, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code,
                                        config=config if quantized_format(folder) and not tokenizer else None)
    if len(tok) > config.vocab_size:
        raise ValueError(f"the tokenizer of {tok_path} has {len(tok):,} tokens but the model's vocabulary has "
                         f"{config.vocab_size:,}: use the model's own tokenizer (--tokenizer)")
    return folder, tok


def _print_eval(args: argparse.Namespace, split: str, res, windows) -> None:
    print(f"{args.model}: {split} perplexity {res.ppl:.3f} over {res.tokens:,} predicted tokens "
          f"({len(windows)} windows of {args.seq_len})")
    if res.kl_mean is not None:
        print(f"KL to {args.reference}: mean {res.kl_mean:.5f} (median {res.kl_median:.5f}, p99 {res.kl_p99:.4f}, "
              f"max {res.kl_max:.3f}), top-1 agreement {100 * res.top1_agreement:.2f}%")


def _cmd_eval_stream(args: argparse.Namespace, tasks: list[str]) -> int:
    import torch

    from quantmoe.data.corpora import load_tokens
    from quantmoe.eval.metrics import make_windows
    from quantmoe.eval.stream import evaluate_stream, open_checkpoint, reference_stream

    if tasks:
        raise ValueError("--stream evaluates perplexity (and KL with --reference) block by block; lm-eval tasks "
                         "need the whole model: run --tasks without --stream")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    folder, tokenizer = _eval_tokenizer(args.model, args.tokenizer, args.trust_remote_code)
    open_checkpoint(folder, dtype, args.trust_remote_code, verify=False)  # its files and the dtype, before work
    ref_folder = None
    if args.reference is not None:
        from quantmoe.quant.cli import model_folder

        ref_folder = model_folder(args.reference)
        open_checkpoint(ref_folder, dtype, args.trust_remote_code, verify=False)
    split = args.split or "test"
    windows = make_windows(load_tokens(split, tokenizer), args.seq_len, args.max_windows)
    reference = None
    if ref_folder is not None:
        reference = reference_stream(ref_folder, windows, batch_size=args.batch_size, device=args.device,
                                     dtype=dtype, progress=True, trust_remote_code=args.trust_remote_code)
    res = evaluate_stream(folder, windows, reference, batch_size=args.batch_size, device=args.device, dtype=dtype,
                          progress=True, trust_remote_code=args.trust_remote_code)
    _print_eval(args, split, res, windows)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from quantmoe.api import load_model_or_quantized

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise ValueError("check `--tasks`: give lm-eval task names separated by commas")
    if args.limit is not None and not tasks:
        raise ValueError("`--limit` applies to `--tasks`: add --tasks, or use --max-windows for perplexity")
    if args.stream:
        return _cmd_eval_stream(args, tasks)
    if args.dtype:
        raise ValueError("--dtype applies to --stream (the whole model is evaluated in float32, a quantized one in "
                         "its own dtype): add --stream or drop --dtype")
    if args.reference is not None and tasks and args.split is None:
        raise ValueError("--reference gives KL on the perplexity text: add --split, or drop --reference")
    model, tokenizer = load_model_or_quantized(args.model, device=args.device,
                                               trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer)
    if args.split is not None or not tasks:
        from quantmoe.data.corpora import load_tokens
        from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs

        split = args.split or "test"
        windows = make_windows(load_tokens(split, tokenizer), args.seq_len, args.max_windows)
        reference = None
        if args.reference is not None:
            from quantmoe.models import load_model

            ref_model, _ = load_model(args.reference, device=args.device, trust_remote_code=args.trust_remote_code)
            reference = reference_logprobs(ref_model, windows, batch_size=args.batch_size, progress=True)
            del ref_model
        res = evaluate(model, windows, reference, batch_size=args.batch_size, progress=True)
        _print_eval(args, split, res, windows)
    if tasks:
        from quantmoe.eval.tasks import format_results, run_tasks

        res = run_tasks(model, tokenizer, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                        batch_size=args.batch_size, seed=args.seed)
        limit = "" if args.limit is None else f", first {args.limit} documents per task"
        print(format_results(res, f"{args.model}: lm-eval ({res.seconds:.1f} s{limit})"))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from quantmoe.demo import run_demo

    return run_demo(threads=args.threads)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default shown, unless it is None or off, or its help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default == argparse.SUPPRESS)
        if (shown and "default" not in text
                and action.option_strings and not isinstance(action, argparse._VersionAction)):
            text += " (default: %(default)s)"
        return text


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``HelpFormatter`` keeping the description and epilog as written (rule tables)."""


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _subparsers(sub)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="embedded model name (mixtral-s, deepseek-s), local folder or hub id")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own Python code from the hub (off by default)")


def build_parser() -> argparse.ArgumentParser:
    from quantmoe.alloc.cli import add_plan_parser
    from quantmoe.alloc.solve_cli import add_solve_parser
    from quantmoe.bench.cli import add_bench_parsers
    from quantmoe.export.cli import add_export_parser
    from quantmoe.quant.cli import add_quantize_parser
    from quantmoe.version import __version__
    from quantmoe.zoo.cli import add_zoo_parser

    parser = argparse.ArgumentParser(prog="quantmoe", description=(
        "Structure-aware mixed-precision post-training quantization of Mixture-of-Experts models."))
    parser.add_argument("--version", action="version", version=f"quantmoe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print the MoE anatomy of a model (from its config alone)",
                       description="Blocks, experts, top-k, shared experts and parameters by role. "
                                   "Needs only the config: weights are not loaded.")
    _add_model_args(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("families", help="every MoE family of the installed transformers: supported or why not",
                       description="The MoE causal-LM model types of the installed transformers, each supported "
                                   "(with its display name) or refused (with the reason). --markdown prints "
                                   "docs/families.md.")
    p.add_argument("--markdown", action="store_true", help="the full table (roles, per-expert view) as Markdown")
    p.set_defaults(func=_cmd_families)

    p = sub.add_parser("eval", help="perplexity on a text, and lm-eval tasks",
                       description="Perplexity over non-overlapping windows of a text (an embedded split, "
                                   "wikitext2, c4 or a .txt file), and/or lm-evaluation-harness tasks "
                                   "(--tasks; qmoe_suite is the local suite of the embedded models).")
    _add_model_args(p)
    p.add_argument("--split", default=None, metavar="TEXT",
                   help="calibration, validation, test, wikitext2, c4 or a .txt path "
                        "(default: test, unless only --tasks is given)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per perplexity window")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate the first N windows only (default: all)")
    p.add_argument("--tasks", default=None, metavar="A,B",
                   help="lm-eval tasks, e.g. qmoe_suite or winogrande,piqa (the paper's: "
                        "winogrande,copa,openbookqa,hellaswag,piqa,mmlu)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (quick checks)")
    p.add_argument("--num-fewshot", type=int, default=None, help="default: the paper's (mmlu 5), else the task's")
    p.add_argument("--seed", type=int, default=0, help="lm-eval seeds")
    p.add_argument("--batch-size", type=int, default=8, help="windows or lm-eval requests per forward")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0")
    p.add_argument("--tokenizer", default=None, metavar="FOLDER_OR_ID",
                   help="take the tokenizer from here (default: the model's own)")
    p.add_argument("--reference", default=None, metavar="MODEL",
                   help="full-precision model to measure KL and top-1 agreement against, on the perplexity "
                        "windows (with --stream: computed block by block once, cached under $QUANTMOE_CACHE)")
    p.add_argument("--stream", action="store_true",
                   help="perplexity (and KL) block by block: one block's weights in memory at a time, read from "
                        "the safetensors files of a full-precision folder or a quantmoe checkpoint; lm-eval "
                        "--tasks keep the whole-model path and are refused with it")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="with --stream, a full-precision model's compute dtype (default: float32, as without "
                        "--stream); a quantized checkpoint computes in its own")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="the main job on the embedded models",
                       description="The default benchmark sweep (sweeps/demo.yaml) on the embedded models: full "
                                   "precision, uniform GPTQ, the paper's heuristics and the budget solver over "
                                   "three calibration seeds, into runs/demo/ with a report. Resumable.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.set_defaults(func=_cmd_demo)

    add_quantize_parser(sub)
    add_export_parser(sub)
    add_plan_parser(sub)
    add_solve_parser(sub)
    add_bench_parsers(sub)
    add_zoo_parser(sub)
    for p in (parser, *_subparsers(parser)):
        raw = issubclass(p.formatter_class, argparse.RawDescriptionHelpFormatter)
        p.formatter_class = RawHelpFormatter if raw else HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    tune_malloc()  # before torch starts its worker threads (quantmoe/allocator.py)
    bound_kernel_caches()  # before the first matmul
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # bad input: one clear line, no traceback (-v shows it)
        if args.verbose:
            raise
        log.error("%s", " ".join(line.strip() for line in str(err).splitlines() if line.strip()))
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            raise
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
