from quantmoe.suggest import close_matches, did_you_mean


def test_did_you_mean_names_the_closest_choices_best_first():
    assert did_you_mean("seedz", ["store", "seeds", "models"]) == "did you mean 'seeds'?"
    assert close_matches("qmoe_clze", ["qmoe_ending", "qmoe_cloze", "qmoe_close"], n=2) == ["qmoe_cloze", "qmoe_close"]
    assert did_you_mean("qmoe_clze", ["qmoe_close", "qmoe_cloze"], n=2) == "did you mean 'qmoe_cloze' or 'qmoe_close'?"


def test_nothing_close_gives_no_hint():
    assert did_you_mean("calibration", ["seeds", "runs"]) == ""
    assert did_you_mean("x", []) == ""


def test_cutoff_and_count_are_respected():
    assert did_you_mean("unifrm", ["uniform", "unit"], n=1) == "did you mean 'uniform'?"
    assert did_you_mean("abc", ["abd"], cutoff=0.9) == ""


def test_plan_files_suggest_the_closest_key():
    import pytest

    from quantmoe.quant.plan import Plan

    with pytest.raises(ValueError, match=r"unknown key\(s\) defaults; did you mean 'default'\? allowed: default"):
        Plan.from_dict({"defaults": {"bits": 4}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) bitz; did you mean 'bits'\? allowed: bits"):
        Plan.from_dict({"default": {"bitz": 4}})
