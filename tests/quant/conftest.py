import pytest


@pytest.fixture
def quantize_settings(monkeypatch):
    """``run(argv)``: the parsed args of ``quantmoe quantize ARGV`` and the GPTQConfig it hands to
    ``api.quantize``, caught there before any model is quantized."""
    from quantmoe import api
    from quantmoe.cli import build_parser
    from quantmoe.quant import cli

    class Stop(Exception):
        pass

    seen = {}

    def fake_quantize(model, tokenizer, plan, calib, gptq, **_):
        seen["gptq"] = gptq
        raise Stop

    monkeypatch.setattr(api, "quantize", fake_quantize)

    def run(argv):
        args = build_parser().parse_args(["quantize", *argv])
        with pytest.raises(Stop):
            cli._cmd_quantize(args)
        return args, seen.pop("gptq")

    return run
