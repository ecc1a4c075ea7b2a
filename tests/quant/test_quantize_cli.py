import argparse
import json
import logging

from quantmoe.cli import _subparsers, build_parser, main


def test_every_option_has_help_and_shows_its_default():
    for parser in _subparsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help text"
            if action.option_strings and action.default is not None and action.default is not False:
                assert f"default: {action.default}" in text or "default" in action.help, \
                    f"{parser.prog} {action.option_strings[0]} does not show its default {action.default!r}"


def test_rtn_fallback_line_names_the_report_file(tmp_path, caplog, tiny_model_dir):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "q"
    with caplog.at_level(logging.WARNING):
        assert main(["quantize", str(tiny_model_dir), "--bits", "4", "--group-size", "16", "--calib", str(calib),
                     "--calib-windows", "2", "--calib-len", "16", "--min-expert-tokens", "100000",
                     "--out", str(out)]) == 0
    report = out / "quant_report.json"
    fallbacks = json.loads(report.read_text())["fallbacks"]
    lines = [r.getMessage() for r in caplog.records if "fell back to RTN" in r.getMessage()]
    assert fallbacks and len(lines) == 1
    assert f"{len(fallbacks)} linears fell back" in lines[0] and str(report) in lines[0]
