import argparse
import re

import pytest

from quantmoe.cli import build_parser, main


def _all_command_paths():
    paths = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    paths.append(prefix + [name])
                    walk(sub, prefix + [name])

    walk(build_parser(), [])
    return paths


@pytest.mark.parametrize("path", _all_command_paths(), ids=" ".join)
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(path + ["--help"])
    assert exc.value.code == 0
    assert "usage: quantmoe" in capsys.readouterr().out


def test_inspect_of_a_local_config(tmp_path, capsys):
    from quantmoe.anatomy import tiny_config, tiny_model

    tiny_config("qwen2_moe").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "qwen2_moe" in out
    # by hand, tiny qwen2_moe (hidden 32, 4 heads, 2 KV heads of 8, qkv biases, 3 blocks, block 0 dense):
    # attention 3 x (q 32x32+32, k 16x32+16, v 16x32+16, o 32x32) = 9,408;
    # quantizable linears 3 x 4 attention + 3 dense MLP + 2 MoE blocks x (4 experts x 3 + 3 shared) = 45
    assert re.search(r"^attention\*\s+9,408\s", out, flags=re.M), out
    assert re.search(r"^quantizable units\s+45 linears$", out, flags=re.M), out
    total = sum(p.numel() for p in tiny_model("qwen2_moe").parameters())
    assert f"sum of roles {total:,} = model parameters {total:,}" in out


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, caplog):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such folder" in caplog.text
    from quantmoe.anatomy import tiny_config

    cfg = tiny_config("mixtral")
    cfg.model_type = "llama"
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(cfg.to_json_string().replace('"mixtral"', '"llama"'))
    assert main(["inspect", str(tmp_path / "llama")]) == 2
    assert "mixtral" in caplog.text  # the supported families are named
    assert main(["quantize", "mixtral-s", "--out", str(tmp_path / "q")]) == 2
    assert "--bits" in caplog.text
