import pytest

from quantmoe.eval.tasks import (
    HEADLINE,
    LOCAL_SUITE,
    LOCAL_TASKS,
    PAPER_TASKS,
    TaskResults,
    TaskScore,
    format_results,
    local_tasks_dir,
    resolve_tasks,
    run_tasks,
    task_manager,
)
from quantmoe.models import load_model

LIMIT = 30


@pytest.fixture(scope="module")
def mixtral_s():
    return load_model("mixtral-s")


@pytest.fixture(scope="module")
def suite_run(mixtral_s):
    model, tokenizer = mixtral_s
    return run_tasks(model, tokenizer, [LOCAL_SUITE], limit=LIMIT)


def test_paper_tasks_have_headlines():
    assert set(PAPER_TASKS) <= set(HEADLINE)
    assert HEADLINE["mmlu"].num_fewshot == 5
    assert HEADLINE["hellaswag"].metric == HEADLINE["openbookqa"].metric == "acc_norm"
    assert all(HEADLINE[t].num_fewshot == 0 for t in PAPER_TASKS if t != "mmlu")


def test_local_yaml_loads_through_the_task_manager():
    manager = task_manager(include_defaults=False)
    assert set(LOCAL_TASKS) | {LOCAL_SUITE} <= set(manager.all_tasks)
    assert LOCAL_SUITE in manager.all_tags
    tasks = manager.load([LOCAL_SUITE])["tasks"]
    assert sorted(tasks) == sorted(LOCAL_TASKS)
    ending, cloze = tasks["qmoe_ending"], tasks["qmoe_cloze"]
    assert len(ending.test_docs()) == len(cloze.test_docs()) == 300
    doc = ending.test_docs()[0]
    assert len(ending.doc_to_choice(doc)) == 4 and 0 <= ending.doc_to_target(doc) < 4
    doc = cloze.test_docs()[0]
    target = cloze.doc_to_target(doc)
    assert target.startswith(" ") and target.strip() in cloze.doc_to_text(doc)  # LAMBADA-style: seen before


def test_data_files_are_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tasks = task_manager(include_defaults=False).load(["qmoe_cloze"])["tasks"]
    assert len(tasks["qmoe_cloze"].test_docs()) == 300
    assert (local_tasks_dir() / "qmoe_cloze.jsonl").is_file()


def test_tags_expand_and_unknown_names_suggest():
    manager = task_manager(include_defaults=False)
    assert resolve_tasks([LOCAL_SUITE, "qmoe_cloze"], manager) == sorted(LOCAL_TASKS)
    with pytest.raises(ValueError, match="did you mean 'qmoe_cloze'"):
        resolve_tasks(["qmoe_clozе"], manager)  # Cyrillic e
    with pytest.raises(ValueError, match="unknown task 'nonsense'"):
        resolve_tasks(["nonsense"], manager)


def test_bad_arguments_are_value_errors(mixtral_s):
    model, tokenizer = mixtral_s
    with pytest.raises(ValueError, match="tasks"):
        run_tasks(model, tokenizer, [])
    with pytest.raises(ValueError, match="limit"):
        run_tasks(model, tokenizer, ["qmoe_cloze"], limit=0)


def test_embedded_model_beats_chance(suite_run):
    assert [s.task for s in suite_run.tasks] == sorted(LOCAL_TASKS)
    ending, cloze = suite_run["qmoe_ending"], suite_run["qmoe_cloze"]
    assert ending.metric == "acc_norm" and ending.samples == LIMIT and ending.num_fewshot == 0
    assert ending.value > 0.25 + 2 * ending.stderr  # 4 choices
    assert cloze.metric == "acc" and cloze.value > 0.05  # greedy exact match: chance is ~0
    assert suite_run.mean == pytest.approx((ending.value + cloze.value) / 2)


def test_rerun_is_identical(mixtral_s, suite_run):
    model, tokenizer = mixtral_s
    again = run_tasks(model, tokenizer, [LOCAL_SUITE], limit=LIMIT)
    assert again.tasks == suite_run.tasks


def test_results_table_and_dict():
    res = TaskResults((TaskScore("piqa", "acc", 0.75, 0.01, 0, 100), TaskScore("mmlu", "acc", 0.25, None, 5, 200)),
                      limit=None, seconds=1.0)
    assert res.mean == 0.5
    table = format_results(res, "title")
    assert "piqa" in table and "0.7500" in table and "mean" in table and "0.5000" in table
    assert res.as_dict()["tasks"]["mmlu"]["num_fewshot"] == 5
    with pytest.raises(KeyError, match="was not run"):
        res["hellaswag"]
