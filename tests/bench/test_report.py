import statistics
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from quantmoe.bench.report import build_report, pareto_front
from quantmoe.bench.store import ResultsStore, RunRecord

SEEDS = (0, 1, 2)
N_BLOCKS, N_EXPERTS = 3, 4
# run name -> (average bits, mean KL, bits of attention, bits of experts 0..3)
RUNS = {
    "uniform 2-bit": (2.0, 0.40, 2, (2, 2, 2, 2)),
    "attention 4 / experts 2": (2.3, 0.25, 4, (2, 2, 2, 2)),
    "solver 2.5": (2.5, 0.15, 4, (4, 2, 2, 3)),
    "top-2 experts at 4": (2.8, 0.08, 4, (4, 4, 2, 2)),
    "uniform 3-bit": (3.0, 0.10, 3, (3, 3, 3, 3)),  # beaten by top-2 experts at 4: more bits, higher KL
}
PARETO_BY_KL = {"uniform 2-bit", "attention 4 / experts 2", "solver 2.5", "top-2 experts at 4"}
MIXED_PARETO = PARETO_BY_KL - {"uniform 2-bit"}


def _plan(attn: int, experts: tuple[int, ...]) -> dict[str, int]:
    plan = {}
    for b in range(N_BLOCKS):
        plan[f"model.layers.{b}.self_attn.q_proj"] = attn
        for e, bits in enumerate(experts):
            plan[f"model.layers.{b}.mlp.experts.{e}.w1"] = bits
    return plan


def _bitmap(attn: int, experts: tuple[int, ...]) -> dict:
    return {"blocks": [{"index": b, "is_moe": True, "attention": float(attn), "dense": None, "shared": None,
                        "experts": [float(x) for x in experts]} for b in range(N_BLOCKS)]}


def _record(model: str, run: str, seed, bits: float, kl: float, attn: int, experts, t: int, tasks: bool,
            sweep: str = "trial") -> RunRecord:
    jitter = 0.0 if seed is None else (seed - 1) * 0.01 * (1 + kl)  # a different spread per run
    metrics = {"ppl": 50.0 * (1 + 2 * kl) + 3 * jitter, "nll": 3.9 + kl, "kl_mean": kl + jitter,
               "kl_median": kl / 2, "kl_p90": 2 * kl, "kl_p99": 5 * kl + jitter, "kl_max": 20 * kl + 0.1,
               "top1_agreement": 1.0 - kl / 2 + jitter / 3}
    if tasks:
        metrics.update({"task:cloze": 0.6 - kl / 2 + jitter, "task_stderr:cloze": 0.02,
                        "task:nextsent": 0.7 - kl / 3, "task_stderr:nextsent": 0.02})
        metrics["task_mean"] = (metrics["task:cloze"] + metrics["task:nextsent"]) / 2
    quantized = seed is not None
    # vLLM's fused MoE takes 4/8-bit experts only; "solver 2.5" seed 2 also fails GPTQModel's rule
    moe = "" if set(experts) <= {4, 8} else "model.layers.0.mlp.experts: experts at 2 bits"
    engines = {"vllm": moe, "sglang": moe, "gptqmodel": "x: group size" if (run, seed) == ("solver 2.5", 2) else "",
               "transformers": "fused experts are not loaded"} if quantized else {}
    return RunRecord(
        key=f"{sweep}-{model}-{run}-{seed}", sweep=sweep, model=model, model_sha256=f"sha-{model}" + "0" * 56,
        run=run, spec={"name": run, "full_precision": True} if not quantized else {"name": run, "policy": run},
        seed=seed, average_bits=bits, effective_bits=bits + 0.14 * quantized, plan=_plan(attn, experts),
        bitmap=_bitmap(attn, experts), quantizer={"method": "gptq", "group_size": 128} if quantized else {},
        calibration={"split": "calibration", "num_windows": 8, "seq_len": 128, "seed": seed} if quantized else {},
        evaluation={"perplexity": {"split": "test", "seq_len": 128, "max_windows": 16}, "tasks": []},
        versions={"quantmoe": "0.1.0", "torch": "2.13.0"}, metrics=metrics, fallbacks=("block 0 expert 3",) * quantized,
        quant_seconds=12.5 * quantized, peak_rss_mb=900.0, peak_device_mb=None,
        checkpoint_bytes=int(bits * 1e6) if quantized else None, created_at=f"2025-01-01T00:00:{t:02d}.000+00:00",
        engines=engines)


def _records(model: str, tasks: bool = False, sweep: str = "trial") -> list[RunRecord]:
    out = [_record(model, "full precision", None, 16.0, 0.0, 16, (16,) * N_EXPERTS, 0, tasks, sweep)]
    for i, (run, (bits, kl, attn, experts)) in enumerate(RUNS.items()):
        out += [_record(model, run, s, bits, kl, attn, experts, 1 + 3 * i + s, tasks, sweep) for s in SEEDS]
    return out


ROUTING = {"tokens": 1024, "split": "calibration",
           "frequency": {str(b): [0.4, 0.3, 0.2, 0.1] for b in range(N_BLOCKS)},
           "mean_weight": {str(b): [0.5] * N_EXPERTS for b in range(N_BLOCKS)}}


def _store(path, models=(("mixtral-s", False), ("deepseek-s", True))):
    with ResultsStore(path) as store:
        for model, tasks in models:
            for r in _records(model, tasks):
                store.add(r)
            store.put_artifact(f"sha-{model}" + "0" * 56, "routing", ROUTING)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store of two models (one with lm-eval tasks) and its report, built once for the module."""
    folder = tmp_path_factory.mktemp("built")
    store_path = _store(folder / "results.sqlite")
    return store_path, build_report(store_path, folder / "report")


@pytest.fixture
def store_path(tmp_path):
    return _store(tmp_path / "results.sqlite", models=(("mixtral-s", False),))


def test_pareto_front_known_answers():
    assert pareto_front([]) == ()
    assert pareto_front([(3.0, 1.0)]) == (0,)
    # (bits, KL): index 2 has more bits and higher KL than index 1; index 3 ties 1's bits with worse KL
    assert pareto_front([(2.0, 0.4), (2.5, 0.1), (3.0, 0.2), (2.5, 0.3), (4.0, 0.05)]) == (0, 1, 4)
    # higher is better: accuracy must rise with bits to stay on the frontier
    assert pareto_front([(2.0, 0.5), (3.0, 0.4), (4.0, 0.7)], higher_is_better=True) == (0, 2)
    assert pareto_front([(2.0, 0.5), (2.0, 0.5)]) == (0,)  # identical points: the first


def _table_rows(md: str, model: str, heading: str = "All runs") -> dict[str, dict[str, str]]:
    section = md.split(f"## {model}\n", 1)[1].split("\n## ", 1)[0].split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split(" | ")]
    return {cells[0]: dict(zip(head, cells)) for cells in
            ([c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:])}


def test_report_files_numbers_and_pareto(built):
    store_path, md_path = built
    out = md_path.parent
    md = md_path.read_text(encoding="utf-8")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{kind}-{m}.png" for kind in ("quality", "effective", "bitmap", "routing")
                          for m in ("mixtral-s", "deepseek-s"))
    for name in pngs:
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert f"]({name})" in md
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('<img src="data:image/png;base64,') == len(pngs) and html.count("<table>") == sum(
        line.startswith("|---") for line in md.splitlines())
    assert "<td>uniform 2-bit</td>" in html and "![" not in html

    with ResultsStore(store_path, create=False) as store:
        records = store.records()
    for model in ("mixtral-s", "deepseek-s"):
        rows = _table_rows(md, model)
        assert set(rows) == set(RUNS) | {"full precision (reference)"}
        assert rows["full precision (reference)"]["seeds"] == "1"
        for run in RUNS:
            mine = [r for r in records if r.model == model and r.run == run]
            assert len(mine) == 3 and rows[run]["seeds"] == "3"
            for key, column, fmt in (("ppl", "ppl", "{:.2f}"), ("kl_mean", "KL", "{:.4f}"),
                                     ("top1_agreement", "top-1", "{:.3f}")):
                vals = [r.metrics[key] for r in mine]
                expected = f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"
                assert rows[run][column] == expected, (model, run, key)
            assert (rows[run]["Pareto"] == "✓") == (run in PARETO_BY_KL), run
        # the bit maps show the mixed-precision runs of the frontier, not the uniform one
        note = next(line for line in md.split(f"## {model}\n", 1)[1].splitlines() if line.startswith("The Pareto"))
        assert all(run in note for run in MIXED_PARETO) and "uniform" not in note
        # serves: the engines that load the export of every seed's plan
        cost = _table_rows(md, model, "Cost, serving and plans")
        assert set(cost) == set(rows)
        assert cost["uniform 2-bit"]["serves"] == "gptqmodel" and cost["solver 2.5"]["serves"] == "none"
        assert cost["full precision (reference)"]["serves"] == "-"
        for run in RUNS:
            mine = [r for r in records if r.model == model and r.run == run]
            assert cost[run]["peak RSS MB"] == f"{max(r.peak_rss_mb for r in mine):.0f}"
            assert cost[run]["quantize s"] == f"{statistics.mean(r.quant_seconds for r in mine):.1f}"
            assert cost[run]["eff. bits"] == rows[run]["eff. bits"]
    assert "task mean" in _table_rows(md, "deepseek-s")["solver 2.5"]  # only the model with lm-eval tasks
    assert "task mean" not in _table_rows(md, "mixtral-s")["solver 2.5"]
    assert "calibration seeds: 0, 1, 2" in md and "torch=2.13.0" in md and "num_windows=8" in md


def test_report_is_deterministic_and_needs_only_the_store(built, tmp_path, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("the report must not load a model")

    for name in ("torch", "transformers", "safetensors"):  # any new import of these fails
        monkeypatch.setitem(sys.modules, name, None)
    for module, loader in (("quantmoe.models", "load_model"), ("quantmoe.bench.shared", "_load")):
        if module in sys.modules:  # already imported by other tests
            monkeypatch.setattr(sys.modules[module], loader, no_models)
    store_path, first = built
    second = build_report(store_path, tmp_path / "again", sweep="trial")
    assert first.read_text(encoding="utf-8") == second.read_text(encoding="utf-8")
    assert (first.parent / "report.html").read_bytes() == (second.parent / "report.html").read_bytes()
    for png in first.parent.glob("*.png"):
        assert png.read_bytes() == (second.parent / png.name).read_bytes()
    assert not [p for p in second.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_rerun_rows_supersede_and_few_seeds_are_flagged(tmp_path):
    path = tmp_path / "results.sqlite"
    old = _records("mixtral-s")
    with ResultsStore(path) as store:
        for r in old:
            store.add(r)
        # the same run stored again later with a changed setting (new key): the later row counts
        from dataclasses import replace

        store.add(replace(old[1], key="new", metrics={**old[1].metrics, "kl_mean": 9.0},
                          created_at="2025-01-02T00:00:00.000+00:00"))
        store.add(_record("mixtral-s", "one seed only", 0, 2.2, 0.3, 4, (2, 2, 2, 2), 50, False))
    md = build_report(path, tmp_path / "r").read_text(encoding="utf-8")
    assert "1 older rows of the same (model, run, seed) were superseded" in md
    assert "warning: mixtral-s: 1 calibration seed (fewer than 3) for one seed only:" in md
    assert "No routing statistics stored" in md
    vals = [9.0] + [r.metrics["kl_mean"] for r in old[2:4]]  # old[1:4]: uniform 2-bit, seeds 0, 1, 2
    assert _table_rows(md, "mixtral-s")["uniform 2-bit"]["KL"].startswith(f"{statistics.mean(vals):.4f} ± ")


def test_empty_store_and_unknown_sweep_are_clear_errors(store_path, tmp_path):
    ResultsStore(tmp_path / "empty.sqlite").close()
    with pytest.raises(ValueError, match="quantmoe bench"):
        build_report(tmp_path / "empty.sqlite", tmp_path / "r")
    with pytest.raises(ValueError, match="--sweep with one of trial"):
        build_report(store_path, tmp_path / "r", sweep="trail")
    with ResultsStore(store_path) as store:
        store.add(_record("mixtral-s", "uniform 2-bit", 0, 2.0, 0.4, 2, (2,) * 4, 5, False, sweep="other"))
    with pytest.raises(ValueError, match="choose one with --sweep"):
        build_report(store_path, tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="quantmoe bench"):
        build_report(tmp_path / "missing.sqlite", tmp_path / "r")


def test_cli_report_and_bench_build_it(store_path, tmp_path, monkeypatch, capsys):
    from quantmoe.bench import report, runner
    from quantmoe.cli import main

    assert main(["report", str(store_path)]) == 0
    assert (store_path.parent / "report" / "report.md").is_file()
    assert main(["report", str(store_path), "--sweep", "nope"]) == 2

    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: trial\nstore: {store_path}\nmodels: [mixtral-s]\n"
                     "runs: [{name: uniform 2-bit, policy: 'uniform=2'}]\n")
    monkeypatch.setattr(runner, "run_sweep", lambda config, store_path, **kw: runner.SweepOutcome(
        store=store_path, ran=0, skipped=16, seconds=0.0))
    calls = []
    monkeypatch.setattr(report, "build_report", lambda *args: calls.append(args) or Path(args[1]) / "report.md")
    assert main(["bench", str(sweep), "--store", str(store_path), "--report-dir", str(tmp_path / "rep")]) == 0
    assert [(a, Path(b), c) for a, b, c in calls] == [(str(store_path), tmp_path / "rep", "trial")]
    assert (tmp_path / "rep" / ".quantmoe-output").is_file()  # the report folder is marked as ours
    assert main(["bench", str(sweep), "--store", str(store_path)]) == 0
    assert (calls[-1][0], Path(calls[-1][1]), calls[-1][2]) == (str(store_path), store_path.parent / "report", "trial")
    assert main(["bench", str(sweep), "--store", str(store_path), "--no-report"]) == 0
    assert len(calls) == 2


def _section(md: str, model: str) -> str:
    return md.split(f"## {model}\n", 1)[1].split("\n## ", 1)[0]


def _md_table(text: str, title_start: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table whose header starts with ``title_start``."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"| {title_start}"))
    head = [c.strip() for c in lines[i].strip("|").split(" | ")]
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("| "):
            break
        rows.append(dict(zip(head, (c.strip() for c in line.strip("|").split(" | ")))))
    return rows


def test_verdict_best_per_budget_front_and_heuristics(store_path, tmp_path):
    with ResultsStore(store_path) as store:  # a heuristic off the front: 2.6 bits, KL 0.20
        for s in SEEDS:
            store.add(_record("mixtral-s", "first 2 blocks at 4", s, 2.6, 0.20, 4, (4, 2, 2, 2), 40 + s, False))
    md = build_report(store_path, tmp_path / "r").read_text(encoding="utf-8")
    verdict = _section(md, "mixtral-s").split("### All runs", 1)[0]
    best = {r["budget (bits)"]: r["best by KL"] for r in _md_table(verdict, "budget")}
    assert best == {"≤ 2.0": "uniform 2-bit", "≤ 2.5": "solver 2.5", "≤ 3.0": "top-2 experts at 4"}
    assert ("Pareto front by KL: uniform 2-bit (2.00 bits, 0.4000) → attention 4 / experts 2 (2.30 bits, 0.2500) → "
            "solver 2.5 (2.50 bits, 0.1500) → top-2 experts at 4 (2.80 bits, 0.0800).") in verdict
    heur = {r["heuristic"]: r for r in _md_table(verdict, "heuristic")}
    assert heur["first 2 blocks at 4"]["front at ≤ its bits"] == "solver 2.5 (2.50 bits)"
    assert heur["first 2 blocks at 4"]["ratio"] == f"{0.20 / 0.15:.2f}×"
    assert heur["top-2 experts at 4"]["front at ≤ its bits"] == "on the front"
    assert "uniform 3-bit" not in heur and "uniform 2-bit" not in heur  # uniform runs are not heuristics


def test_plans_are_linked_and_the_cli_writes_one(store_path, tmp_path, monkeypatch, caplog):
    import yaml

    from quantmoe.cli import main

    md = build_report(store_path, tmp_path / "r").read_text(encoding="utf-8")
    assert "[yaml](plans/mixtral-s-solver-2.5.yaml)" in md
    with ResultsStore(store_path, create=False) as store:
        record = [r for r in store.records() if r.run == "solver 2.5"][-1]

    def bits_of(path: Path) -> dict[str, int]:
        plan = yaml.safe_load(path.read_text(encoding="utf-8"))
        return {n: plan.get("modules", {}).get(n, {}).get("bits", plan["default"]["bits"]) for n in record.plan}

    assert bits_of(tmp_path / "r" / "plans" / "mixtral-s-solver-2.5.yaml") == record.plan
    out = tmp_path / "mine.yaml"
    assert main(["report", str(store_path), "--plan", "solver 2.5", "--out", str(out)]) == 0
    assert bits_of(out) == record.plan
    out.write_text("keep me")
    assert main(["report", str(store_path), "--plan", "solver 2.5", "--out", str(out)]) == 2
    assert out.read_text() == "keep me" and "--overwrite" in caplog.text
    assert main(["report", str(store_path), "--plan", "solver 2.5", "--out", str(out), "--overwrite"]) == 0
    assert bits_of(out) == record.plan
    assert main(["report", str(store_path), "--plan", "solver 3", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "solver 2.5" in caplog.text and not (tmp_path / "x.yaml").exists()  # names the runs there are


def test_rebuild_hint_works_from_the_current_folder(store_path, tmp_path, monkeypatch):
    import re
    import shlex

    for cwd in (tmp_path, tmp_path.parent, Path("/")):
        monkeypatch.chdir(cwd)
        md = build_report(store_path, tmp_path / "r").read_text(encoding="utf-8")
        path = shlex.split(re.search(r"Rebuild with `quantmoe report (.+?) --sweep", md).group(1))[0]
        assert Path(path).is_file() and Path(path).resolve() == store_path.resolve()


def test_quality_labels_do_not_overlap():
    import matplotlib.pyplot as plt

    from quantmoe.bench import plots

    # crowded like deepseek-s: several heuristics within 0.2 bits and similar KL
    labels = ("attention 4 / experts 2", "top-2 frequent experts at 4", "shared experts 8", "first 2 blocks at 4",
              "down_proj at 4", "outlier top-25% at 4", "predicted top-2 blocks at 4", "solver 2.5", "uniform 3-bit")
    bits = (2.44, 2.63, 2.64, 2.65, 2.96, 2.62, 3.06, 2.50, 3.00)
    kl = (0.0608, 0.0592, 0.0585, 0.0600, 0.0287, 0.0590, 0.0217, 0.0379, 0.0461)
    series = [plots.Series(title="KL", log=True, higher_is_better=False, labels=labels, bits=bits, mean=kl,
                           std=(0.001,) * len(kl), frontier=(0, 7, 6), reference=None)]
    fig = plots.quality_figure("deepseek-s", series)
    ax = fig.axes[0]
    texts = [t for t in ax.texts if t.get_text() in labels or t.get_text().isdigit()]
    assert len(texts) == len(labels)
    assert plots.overlapping_labels(fig, texts) == []
    x, y = np.array(bits), np.array(kl)
    assert plots.labels_over_points(fig, ax, texts, x, y) == []  # nor covers another run's marker
    plt.close(fig)
    # the same labels written at their points do overlap: the test above can fail
    fig, ax = plt.subplots(figsize=(11.0, 4.6))
    ax.set_yscale("log")
    ax.plot(bits, kl, "o")
    raw = [ax.text(b, k, label, fontsize=8) for b, k, label in zip(bits, kl, labels)]
    assert plots.overlapping_labels(fig, raw)
    assert plots.labels_over_points(fig, ax, raw, x, y)
    plt.close(fig)


def test_wide_bitmaps_wrap_into_rows(tmp_path):
    from quantmoe.bench import plots

    # deepseek-s-like: 6 blocks, attention + dense + shared + 16 experts, four plans
    bm = {"blocks": [{"index": b, "is_moe": b > 0, "attention": 4.0, "dense": 4.0 if b == 0 else None,
                      "shared": None if b == 0 else 4.0, "experts": [2.0] * 16 if b else []} for b in range(6)]}
    plots.bitmap_png("deepseek-s", [(f"plan {i}", bm) for i in range(4)], tmp_path / "b.png")
    height, width = matplotlib.image.imread(tmp_path / "b.png").shape[:2]
    assert width <= 1750 and height > 600  # two rows of two panels, not one 3445 px strip


_CHECK_JS = """<script>
window.addEventListener("load", () => {
  const oneLine = c => { const r = document.createRange(); r.selectNodeContents(c);
                         return new Set([...r.getClientRects()].map(x => Math.round(x.top))).size <= 1; };
  const cells = [...document.querySelectorAll("td, th")];
  const out = {images: [...document.images].map(i => i.complete && i.naturalWidth > 0),
               overflow: cells.filter(c => c.scrollWidth > c.clientWidth).map(c => c.textContent),
               wrapped: [...document.querySelectorAll("td")].filter(c => !oneLine(c)).map(c => c.textContent),
               wide: [...document.querySelectorAll(".scroll")].filter(d => d.scrollWidth > d.clientWidth)
                       .map(d => d.querySelector("th").textContent),
               headings: document.querySelectorAll("h1, h2").length,
               height: document.documentElement.scrollHeight};
  const pre = document.createElement("pre"); pre.id = "qmoe-check"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def test_html_report_renders_in_headless_chromium(built, tmp_path):
    import json
    import re
    import shutil
    import subprocess

    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("no chromium: install it (Debian: apt-get install -y chromium; `make test` does so as root) "
                    "to check the HTML report in a real browser")
    html = (built[1].parent / "report.html").read_text(encoding="utf-8")
    page = tmp_path / "check.html"  # the report is self-contained (images are data URIs): a copy renders alike
    page.write_text(html.replace("</body>", _CHECK_JS + "</body>"), encoding="utf-8")
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                           "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="qmoe-check">(.*?)</pre>', proc.stdout, flags=re.S)
    assert found, f"chromium rendered no page (exit {proc.returncode}): {proc.stderr[-1000:]}"
    check = json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    assert len(check["images"]) == html.count("<img ") and all(check["images"])  # every image loads
    assert check["overflow"] == [] and check["wrapped"] == []  # no cell overflows, "57.97 ± 0.08" on one line
    assert check["wide"] == []  # every table fits the 1400-px page: none hides columns behind a scroll bar
    assert check["headings"] == 1 + 2 + 1 and check["height"] > 1000  # title, two models, "How this was made"


def test_effective_bits_front_is_compared_with_uniform(built):
    md = built[1].read_text(encoding="utf-8")
    section = _section(md, "mixtral-s").split("### Quality vs effective bits", 1)[1].split("###", 1)[0]
    rows = {r["run"]: r for r in _md_table(section, "run")}
    assert set(rows) == PARETO_BY_KL  # the fixture's effective bits are its average bits + 0.14
    assert rows["solver 2.5"]["eff. bits"] == "2.640" and rows["solver 2.5"]["avg bits"] == "2.500"
    # each against the cheapest uniform run with at least its effective bits
    assert rows["uniform 2-bit"]["vs uniform at ≥ its eff. bits"] == "1.00× uniform 2-bit (2.14)"
    assert rows["solver 2.5"]["vs uniform at ≥ its eff. bits"] == f"{0.15 / 0.10:.2f}× uniform 3-bit (3.14)"
    assert rows["top-2 experts at 4"]["vs uniform at ≥ its eff. bits"] == f"{0.08 / 0.10:.2f}× uniform 3-bit (3.14)"
    assert "](effective-mixtral-s.png)" in section
