"""Experiment files and ``backdoorlab run``: validation up front, shared clean models, resume after a
failure or a SIGKILL without losing or duplicating rows, the report, and Ray against the local run.

One small grid (digits, a half-width Digit-CNN, 2 epochs, two seeds: 8 cells) is run once locally
and serves as the reference for every other run: on this CPU the numbers are deterministic, so
every non-timing metric must match *exactly*, however the grid was run (resumed, killed, on Ray).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from backdoorlab.cli import main
from backdoorlab.errors import ConfigError
from backdoorlab.experiments import TABLE_FILE, executors, parse_experiment, prepare, run_experiment
from backdoorlab.experiments.table import TIMING_METRICS

SRC = str(Path(__file__).resolve().parents[1] / "src")
GRID = {
    "name": "test grid",
    "seeds": [0, 1],
    "train": {"epochs": 2, "batch_size": 64},
    "resources": {"cpus": 1},
    "datasets": ["digits"],
    "models": [{"name": "digit-cnn", "width": 0.5}],
    "attacks": [
        {"label": "BadNets", "attack": "badnets", "params": {"patch_size": 2}},
        {"label": "BadNets (head)", "attack": "badnets", "params": {"patch_size": 2, "restrict": "head"}},
    ],
    "defenses": [{"name": "activation-clustering", "attacks": ["BadNets"], "params": {"tsne_points": 60}}],
    "tables": [
        {"kind": "pivot", "title": "Table 2", "metrics": ["clean_accuracy", "attack_success_rate"], "labels": {"attack_success_rate": "ASR"}},
        {"kind": "pivot", "title": "Table 4", "metrics": ["changed_parameters", "changed_parameters_outside_head"], "rows": ["attack"], "cols": ["metric"], "format": ".0f"},
        {"kind": "histogram", "title": "Table 5"},
        {"kind": "defense", "title": "Defenses", "metrics": ["ari", "silhouette"]},
    ],
    "plots": [
        {"kind": "images", "title": "Samples"},
        {"kind": "images", "title": "AC", "cells": "defense", "file": "*.png"},
    ],
}
SEED0 = ["clean/digits/digit-cnn-w0.5/s0", "attack/digits/digit-cnn-w0.5/badnets/s0", "attack/digits/digit-cnn-w0.5/badnets-head/s0", "defense/digits/digit-cnn-w0.5/badnets/activation-clustering/s0"]
SEED1 = [c.replace("/s0", "/s1") for c in SEED0]


def write_grid(path: Path, doc: dict = GRID) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def values(out: Path) -> dict:
    """(cell, metric) -> value for every non-timing row; also checks that no key appears twice in the file."""
    lines = [json.loads(x) for x in (out / TABLE_FILE).read_text().splitlines()]
    keys = [(r["cell"], r["metric"]) for r in lines]
    assert len(keys) == len(set(keys)), "duplicate rows in the table"
    return {k: r["value"] for k, r in zip(keys, lines) if r["metric"] not in TIMING_METRICS}


def stamps(out: Path, cells: list[str]) -> dict[str, int]:
    return {c: (out / "cells" / c / "metrics.json").stat().st_mtime_ns for c in cells}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    f = write_grid(d / "grid.yaml")
    res = run_experiment(f, d / "out", progress=False)
    return f, d / "out", res


# ------------------------------------------------------------------ the file is checked before any work


def _mutate(path: str, value):
    def apply(doc: dict) -> dict:
        doc = copy.deepcopy(doc)
        *parents, last = path.split(".")
        cur = doc
        for p in parents:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        if value is KeyError:
            del cur[last]
        elif isinstance(cur, list):
            cur[int(last)] = value
        else:
            cur[last] = value
        return doc

    return apply


@pytest.mark.parametrize("change, field, text", [
    (_mutate("datasets.0", "imagenet21k"), "datasets[0].name", "unknown dataset"),
    (_mutate("models.0.name", "gpt"), "models[0].name", "unknown model"),
    (_mutate("attacks.0.attack", "nope"), "attacks[0].attack", "unknown attack 'nope'"),
    (_mutate("attacks.0.params.patch_size", 0), "attacks[0].params.patch_size", ">= 1"),
    (_mutate("attacks.1.params.colour", "red"), "attacks[1].params.colour", "unknown parameter"),
    (_mutate("attacks.0.params.target", 10), "attacks[0].params.target", "out of range"),
    (_mutate("attacks.0.sweep", {"poison_rate": [0.1, 1.5]}), "attacks[0].params.poison_rate", "(0, 1]"),
    (_mutate("attacks.0.sweep", {"poison_rate": 0.1}), "attacks[0].sweep.poison_rate", "list"),
    (_mutate("attacks.1.train", {"lr": -1}), "attacks[1].train.lr", "(0, 100]"),
    (_mutate("train.epochs", -1), "train.epochs", "[0, 100000]"),
    (_mutate("train.epochs", 10**9), "train.epochs", "got 1000000000"),
    (_mutate("train.lr", float("inf")), "train.lr", "finite"),
    (_mutate("models.0.width", float("nan")), "models[0].width", "finite"),
    (_mutate("resources.cpus", True), "resources.cpus", "expected a number"),
    (_mutate("device", "bogus"), "device", "unknown device"),
    (_mutate("train.optimiser", "adam"), "train.optimiser", "unknown parameter"),
    (_mutate("datasets.0", {"name": "digits", "train": {"schedule": "weird"}}), "datasets[0].train.schedule", "must be one of"),
    (_mutate("attacks.1.label", "BadNets"), "attacks", "twice"),
    (_mutate("seeds", [0, 0]), "seeds", "repeated"),
    (_mutate("defenses.0.name", "magic"), "defenses[0].name", "unknown defense"),
    (_mutate("defenses.0.params", {"dims": 0}), "defenses[0].params.dims", ">= 1"),
    (_mutate("defenses.0.attacks", ["WaNet"]), "defenses[0].attacks", "no attack labelled 'WaNet'"),
    (_mutate("tables.0.kind", "heatmap"), "tables[0].kind", "unknown table kind 'heatmap'"),
    (_mutate("tables.0.metrics", []), "tables[0].metrics", "at least one"),
    (_mutate("tables.0.cols", ["dataset"]), "tables[0].cols", "several metrics"),
    (_mutate("tables.1.rows", ["colour"]), "tables[1].rows", "unknown field"),
    (_mutate("tables.0.where", {"attack": ["WaNet"]}), "tables[0].where.attack", "not in this experiment"),
    (_mutate("plots.0.kind", "movie"), "plots[0].kind", "unknown plot kind"),
    (_mutate("resources.gpus", -1), "resources.gpus", "[0, 1024]"),
    (_mutate("colour", "red"), "colour", "unknown key"),
    (_mutate("models", KeyError), "models", "required"),
    (_mutate("attacks.0.datasets", ["mnist5k"]), "attacks[0].datasets", "no dataset 'mnist5k'"),
    (_mutate("attacks.0.dataset_params", {"digits": {"patch_size": 0}}), "attacks[0].params.patch_size", ">= 1"),
    (_mutate("attacks.0.dataset_params", {"digits": 3}), "attacks[0].dataset_params.digits", "mapping"),
    (_mutate("defenses.0.repeats", 0), "defenses[0].repeats", "1 to 100"),
    (_mutate("defenses.0.inspect_poison_rate", 1.5), "defenses[0].inspect_poison_rate", "(0, 1]"),
    (_mutate("tables.3", {"kind": "control", "defenses": ["magic"]}), "tables[3].defenses", "no defense labelled 'magic'"),
])
def test_bad_files_fail_before_any_work_naming_the_field(tmp_path, change, field, text):
    with pytest.raises(ConfigError) as e:
        prepare(parse_experiment(change(GRID)), tmp_path / "out")
    assert e.value.field == field, str(e.value)
    assert text in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_run_refuses_a_bad_file_and_a_bad_executor(tmp_path, capsys):
    bad = write_grid(tmp_path / "bad.yaml", _mutate("attacks.0.params.patch_size", 0)(GRID))
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "attacks[0].params.patch_size" in capsys.readouterr().err
    good = write_grid(tmp_path / "good.yaml")
    assert main(["run", str(good), "--out", str(tmp_path / "o"), "--executor", "slurm"]) == 2
    assert "executor: unknown executor 'slurm'; choose one of: local, processes, ray" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["run", str(good), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "8 cells, 8 to run" in capsys.readouterr().out


def test_grid_shares_one_clean_model_per_dataset_model_and_seed(tmp_path):
    doc = copy.deepcopy(GRID)
    doc["attacks"][0]["sweep"] = {"poison_rate": [0.05, 0.2]}
    doc["defenses"][0]["clean_model"] = True
    grid = prepare(parse_experiment(doc), tmp_path)
    kinds = [c.kind for c in grid]
    assert kinds.count("clean") == 2 and kinds.count("attack") == 6 and kinds.count("defense") == 8
    for c in grid:
        assert all(grid.cells.index(grid.by_id[d]) < grid.cells.index(c) for d in c.deps)  # dependency order
        if c.kind == "attack":
            clean = grid.by_id[c.deps[0]]
            assert clean.kind == "clean" and clean.seed == c.seed == c.job.seed
            assert c.job.clean_model == str(clean.dir / "model.safetensors")
    labels = [c.attack for c in grid if c.kind == "attack" and c.seed == 0]
    assert labels == ["BadNets (poison_rate=0.05)", "BadNets (poison_rate=0.2)", "BadNets (head)"]
    assert [c.job.params["poison_rate"] for c in grid if c.group == "BadNets" and c.kind == "attack" and c.seed == 0] == [0.05, 0.2]
    # Activation Clustering reads the attack's data: its control runs beside every attack cell, on the same run
    on_clean = [c for c in grid if c.inspected == "clean model"]
    assert len(on_clean) == 4 and all(c.job.model == "clean" for c in on_clean)
    for c in on_clean:
        twin = grid.by_id[c.id.replace("-clean-model/", "/")]
        assert (twin.inspected, twin.job.model, twin.attack) == ("backdoored", "backdoored", c.attack)
        assert c.deps == twin.deps and c.job.run == twin.job.run and c.job.seed == twin.job.seed


def test_a_defense_entry_passes_its_inspection_rate_to_every_job_and_only_then_into_the_config(tmp_path):
    doc = copy.deepcopy(GRID)
    doc["defenses"] = [{"name": "spectral-signatures", "clean_model": True}, {"label": "SS 10%", "name": "spectral-signatures", "inspect_poison_rate": 0.1}]
    cells = [c for c in prepare(parse_experiment(doc), tmp_path) if c.kind == "defense"]
    rates = {(c.defense, c.job.inspect_poison_rate) for c in cells}
    assert rates == {("spectral-signatures", None), ("SS 10%", 0.1)}
    assert all(("inspect_poison_rate" in c.job.config()) == (c.defense == "SS 10%") for c in cells)  # older runs keep their config


def test_defense_repeats_and_a_model_inspection_control_run_once(tmp_path):
    doc = copy.deepcopy(GRID)
    doc["seeds"] = [0]
    doc["defenses"] = [{"name": "neural-cleanse", "clean_model": True, "repeats": 3}]
    grid = prepare(parse_experiment(doc), tmp_path)
    cells = [c for c in grid if c.kind == "defense"]
    # two attacks x three defense seeds on the backdoored models; the clean model once per defense seed
    assert sorted((c.attack, c.repeat) for c in cells if c.inspected == "backdoored") == [(a, r) for a in ("BadNets", "BadNets (head)") for r in range(3)]
    control = [c for c in cells if c.inspected == "clean model"]
    assert [(c.attack, c.repeat) for c in control] == [("clean model", r) for r in range(3)]
    assert [(c.job.seed, c.job.heldout_seed) for c in control] == [(0, 0), (1000, 1), (2000, 2)]
    assert [c.id for c in cells if c.repeat == 0 and c.inspected == "backdoored"][0] == "defense/digits/digit-cnn-w0.5/badnets/neural-cleanse/s0"
    assert len({c.id for c in cells}) == len(cells) == 9


def test_an_attack_entry_can_run_on_some_datasets_with_their_own_parameters(tmp_path):
    doc = copy.deepcopy(GRID)
    doc["seeds"] = [0]
    doc["datasets"] = ["digits", "mnist5k"]
    doc["attacks"][0].update(dataset_params={"mnist5k": {"patch_size": 4}})
    doc["attacks"][1].update(datasets=["digits"])
    grid = prepare(parse_experiment(doc), tmp_path)
    attacks = {(c.group, c.dataset): c.job.params["patch_size"] for c in grid if c.kind == "attack"}
    assert attacks == {("BadNets", "digits"): 2, ("BadNets", "mnist5k"): 4, ("BadNets (head)", "digits"): 2}
    defended = sorted((c.group, c.dataset) for c in grid if c.kind == "defense")
    assert defended == [("BadNets", "digits"), ("BadNets", "mnist5k")]


def test_a_second_run_on_the_same_folder_at_once_is_refused(tmp_path):
    import fcntl

    f = write_grid(tmp_path / "grid.yaml")
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out/run.lock", "w") as held:  # as another running process would hold it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError) as e:
            run_experiment(f, tmp_path / "out", progress=False)
    assert e.value.field == "out" and "another backdoorlab process" in str(e.value)
    assert not (tmp_path / "out" / TABLE_FILE).exists()


# ------------------------------------------------------------------ running, resuming, the report


def test_local_run_writes_one_row_per_cell_and_metric_and_a_report(reference):
    f, out, res = reference
    assert res.ok and sorted(res.ran) == sorted(SEED0 + SEED1) and not res.skipped
    table = values(out)
    for cell in SEED0 + SEED1:
        m = json.loads((out / "cells" / cell / "metrics.json").read_text())
        for k, v in m.items():
            if isinstance(v, (int, float)) and k not in TIMING_METRICS:
                assert table[(cell, k)] == v
    for s in (0, 1):
        clean = json.loads((out / f"cells/clean/digits/digit-cnn-w0.5/s{s}/metrics.json").read_text())
        for a in ("badnets", "badnets-head"):
            d = out / f"cells/attack/digits/digit-cnn-w0.5/{a}/s{s}"
            assert not (d / "clean_model.safetensors").exists()  # started from the shared clean model, not a retrained one
            assert table[(str(d.relative_to(out / "cells")), "clean_accuracy_before")] == clean["clean_accuracy"]
        assert table[(f"attack/digits/digit-cnn-w0.5/badnets-head/s{s}", "changed_parameters_outside_head")] == 0
    report = (out / "report.md").read_text()
    asr = [table[(f"attack/digits/digit-cnn-w0.5/badnets/s{s}", "attack_success_rate")] for s in (0, 1)]
    assert f"{statistics.fmean(asr):.3f} ± {statistics.stdev(asr):.3f}" in report  # mean ± std over the seeds
    assert "| Attack | digits · clean_accuracy | digits · ASR |" in report and "## Table 5" in report and "[1e-05, 0.0001)" in report
    for rel in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (out / rel).is_file()
    assert "badnets/s0/samples.png" in report and "activation_clustering" in report
    assert json.loads((out / "progress.json").read_text())["done"] == 8
    # where the time went: every cell's wall time, grouped by entry
    secs = {c: json.loads((out / "cells" / c / "metrics.json").read_text())["seconds"] for c in SEED0 + SEED1}
    timing = report[report.index("## Where the time went"):]
    row = next(line for line in timing.splitlines() if line.startswith("| attack | BadNets (head) |"))
    head = [secs[c] for c in SEED0 + SEED1 if "badnets-head" in c]
    assert row.split(" | ")[2:4] == ["2", f"{sum(head) / 60:.1f}"]
    assert f"{sum(secs.values()) / 60:.1f} min" in timing


def test_publishing_a_report_copies_every_figure_it_shows(reference, tmp_path, repo_script):
    publish = repo_script("scripts", "publish_report").publish

    _, out, _ = reference
    target = tmp_path / "docs" / "grid.md"
    n = publish(out, target, "Run on a test machine.")
    text = target.read_text()
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert n == len(links) > 0 and all(rel.startswith("grid/") and (target.parent / rel).is_file() for rel in links)
    assert text.splitlines()[2] == "Run on a test machine." and "cells/" not in "".join(links)
    with pytest.raises(SystemExit, match="report.md"):
        publish(tmp_path / "nowhere", target)


def test_publishing_copies_the_grids_own_plots_too(tmp_path, repo_script):
    publish = repo_script("scripts", "publish_report").publish
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    (run / "cells/attack/a/s0").mkdir(parents=True)
    (run / "figures/figure-5-asr.png").write_bytes(b"sweep")
    (run / "cells/attack/a/s0/samples.png").write_bytes(b"cell")
    (run / "report.md").write_text("# T\n\n![k](figures/figure-5-asr.png)\n\n![a](cells/attack/a/s0/samples.png)\n")
    target = tmp_path / "docs" / "g.md"
    assert publish(run, target) == 2
    text = target.read_text()
    assert "](g/figures_figure-5-asr.png)" in text and "](g/attack_a_s0_samples.png)" in text
    assert (target.parent / "g/figures_figure-5-asr.png").read_bytes() == b"sweep"
    assert (target.parent / "g/attack_a_s0_samples.png").read_bytes() == b"cell"


def test_auto_runs_small_cells_side_by_side_even_when_most_cells_are_large(tmp_path):
    doc = copy.deepcopy(GRID)
    doc["resources"] = {"cpus": 2}  # clean models and defenses on both cores
    doc["attacks"][0]["resources"] = {"cpus": 1}
    cells = list(prepare(parse_experiment(doc), tmp_path / "a"))
    big = sum(c.resources.cpus == 2 for c in cells)
    assert big > len(cells) // 2  # the median cell asks for the whole machine
    assert executors.side_by_side(cells, 2) and not executors.side_by_side(cells, 1.5)
    doc["attacks"][0]["resources"] = {"cpus": 2}
    assert not executors.side_by_side(list(prepare(parse_experiment(doc), tmp_path / "b")), 2)
    assert not executors.side_by_side(cells[:1], 8)  # one cell: nothing to put beside it


def test_run_again_redoes_nothing(reference):
    f, out, _ = reference
    before, table = stamps(out, SEED0 + SEED1), (out / TABLE_FILE).read_bytes()
    res = run_experiment(f, out, progress=False)
    assert res.ran == [] and sorted(res.skipped) == sorted(SEED0 + SEED1)
    assert stamps(out, SEED0 + SEED1) == before and (out / TABLE_FILE).read_bytes() == table


def test_a_failing_cell_blocks_only_what_needs_it_then_resumes(tmp_path, monkeypatch, reference):
    f, ref_out, _ = reference
    real = executors.execute_cell

    def flaky(cell, progress=True):
        if cell.id == SEED1[0]:
            raise RuntimeError("simulated crash in the clean model of seed 1")
        return real(cell, progress)

    monkeypatch.setattr(executors, "execute_cell", flaky)
    res = run_experiment(f, tmp_path / "out", progress=False)
    assert list(res.failed) == [SEED1[0]] and sorted(res.blocked) == sorted(SEED1[1:]) and sorted(res.ran) == sorted(SEED0)
    assert "simulated crash" in (tmp_path / "out/cells" / SEED1[0] / "error.txt").read_text()
    assert {c for c, _ in values(tmp_path / "out")} == set(SEED0)
    assert "## Failed cells" in (tmp_path / "out/report.md").read_text()
    monkeypatch.setattr(executors, "execute_cell", real)
    first = stamps(tmp_path / "out", SEED0)
    res = run_experiment(f, tmp_path / "out", progress=False)
    assert res.ok and sorted(res.ran) == sorted(SEED1) and stamps(tmp_path / "out", SEED0) == first
    assert not (tmp_path / "out/cells" / SEED1[0] / "error.txt").exists()
    assert values(tmp_path / "out") == values(ref_out)


def test_sigkill_mid_grid_then_rerun_loses_nothing_and_duplicates_nothing(tmp_path, reference):
    f, ref_out, _ = reference
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "backdoorlab.cli", "run", str(f), "--out", str(out), "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            table = out / TABLE_FILE
            if table.exists() and len({json.loads(x)["cell"] for x in table.read_text().splitlines() if x.endswith("}")}) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finished = [c for c in SEED0 + SEED1 if (out / "cells" / c / "metrics.json").exists()]
    assert 3 <= len(finished) < 8
    before = stamps(out, finished)
    # worse than a kill between cells: a torn last line, and a finished cell whose rows never got written
    rows = [x for x in (out / TABLE_FILE).read_text().splitlines() if json.loads(x)["cell"] != finished[1]]
    (out / TABLE_FILE).write_text("\n".join(rows) + '\n{"cell": "clean/digits/digit-cnn-w0.5/s1", "metr')
    res = run_experiment(f, out, progress=False)
    assert res.ok and sorted(res.skipped) == sorted(finished) and sorted(res.ran) == sorted(set(SEED0 + SEED1) - set(finished))
    assert stamps(out, finished) == before
    assert values(out) == values(ref_out)


def _ray_available() -> None:
    """Ray is the optional extra ``ray``; scripts/setup.sh installs it, and under CI (CI=true) or with BACKDOORLAB_REQUIRE_RAY=1 its absence fails."""
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("BACKDOORLAB_REQUIRE_RAY") == "1" or os.environ.get("CI") == "true":
            raise
        pytest.skip("ray is not installed (pip install -e '.[ray]'); set BACKDOORLAB_REQUIRE_RAY=1 to make this a failure")


def test_ray_continues_a_local_run_and_matches_it_exactly(tmp_path, reference):
    _ray_available()
    f, ref_out, _ = reference
    out = tmp_path / "moved"
    for cell in SEED0:  # seed 0 was run locally (in another folder); Ray does the rest
        shutil.copytree(ref_out / "cells" / cell, out / "cells" / cell)
    res = run_experiment(f, out, executor="ray", num_cpus=2, progress=False)
    assert res.ok and sorted(res.skipped) == sorted(SEED0) and sorted(res.ran) == sorted(SEED1)
    assert values(out) == values(ref_out)  # exact equality: same thread count, deterministic CPU kernels


def test_mmlm_curve_table_averages_each_budget_over_seeds(tmp_path, repo_script):
    mod = repo_script("scripts", "mmlm_curve")
    curves, markdown = mod.curves, mod.markdown

    for seed, (asr, clean, left) in enumerate([(0.5, 0.1, 0.4), (0.7, 0.3, 0.6)]):
        d = tmp_path / "cells" / "attack" / "mnist5k" / "digit-cnn" / "mmlm" / f"s{seed}"
        d.mkdir(parents=True)
        curve = [{"epsilon": 64 / 255, "steps": 50, "attack_success_rate": asr, "attack_success_rate_clean_model": clean, "latent_distance_left": left}]
        (d / "metrics.json").write_text(json.dumps({"asr_curve": curve}))
    data = curves(tmp_path, "mmlm")
    assert data[("mnist5k", "digit-cnn", round(64 / 255, 6))]["backdoored"] == [0.5, 0.7]
    row = markdown(data).splitlines()[-1]
    assert row == f"| mnist5k | digit-cnn | 64 | 50 | 60.00 ± {100 * statistics.stdev([0.5, 0.7]):.2f} | 20.00 ± {100 * statistics.stdev([0.1, 0.3]):.2f} | 50.0 ± {100 * statistics.stdev([0.4, 0.6]):.1f} | 2 |"


def test_redoing_a_deleted_cell_reruns_what_needs_it_or_names_what_to_delete(tmp_path, reference):
    f, ref_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    attack, defense = SEED0[1], SEED0[3]
    shutil.rmtree(out / "cells" / attack)
    with pytest.raises(ConfigError, match="delete .*activation-clustering"):  # a finished dependent is stale
        run_experiment(f, out, progress=False)
    assert (out / "cells" / defense / "metrics.json").exists()  # nothing is deleted for the user
    (out / "cells" / defense / "metrics.json").unlink()  # unfinished dependent: resumes once its input is redone
    res = run_experiment(f, out, progress=False)
    assert res.ok and sorted(res.ran) == sorted([attack, defense])
    assert values(out) == values(ref_out)


def test_control_table_judges_each_defense_against_its_clean_model_over_seed_pairs(tmp_path):
    from backdoorlab.experiments.context import Context
    from backdoorlab.experiments.report import ControlParams, ControlTable

    doc = copy.deepcopy(GRID)
    doc["defenses"] = [{"label": "SS", "name": "spectral-signatures", "clean_model": True, "repeats": 2}]
    exp = parse_experiment(doc)

    def row(attack, inspected, seed, rep, value):
        return {"cell": f"{attack}{inspected}{seed}{rep}", "kind": "defense", "dataset": "digits", "model": "digit-cnn-w0.5", "attack": attack,
                "group": attack, "sweep": {}, "defense": "SS", "inspected": inspected, "seed": seed, "repeat": rep, "metric": "auroc", "value": value}

    rows = []
    for seed in (0, 1):
        for rep in (0, 1):
            rows += [row("BadNets", "backdoored", seed, rep, 0.95 + 0.01 * rep), row("BadNets", "clean model", seed, rep, 0.5)]
            # above its control on three pairs, below on the fourth
            rows += [row("BadNets (head)", "backdoored", seed, rep, 0.9 if (seed, rep) != (1, 1) else 0.45), row("BadNets (head)", "clean model", seed, rep, 0.5)]
    ctx = Context(exp, tmp_path, rows, [])
    text = ControlTable().render(ctx, ControlParams())
    lines = {line.split(" | ")[2]: line for line in text.splitlines() if line.startswith("| digits")}
    assert lines["BadNets"].endswith("| 4 | detected |") and "0.455 ± 0.006" in lines["BadNets"]
    assert "| 4 | not shown (smallest margin over the control -0.05 < 0.1) |" in lines["BadNets (head)"]
    # two pairs are too few for a claim, whatever their margin; a missing control value is said
    few = [r for r in rows if r["attack"] == "BadNets" and (r["seed"] == 0 or r["inspected"] == "backdoored")]
    text = ControlTable().render(Context(exp, tmp_path, few, []), ControlParams())
    assert "too few pairs (2 < 3; 2 without a control value)" in text
    # far above its control but below chance + margin: an AUROC of 0.4 detects nothing
    low = [{**r, "value": 0.4 if r["inspected"] == "backdoored" else 0.2} for r in rows if r["attack"] == "BadNets"]
    text = ControlTable().render(Context(exp, tmp_path, low, []), ControlParams())
    assert "| 0.200 ± 0.000 | 4 | not shown (at or below chance: smallest value 0.4 < 0.5 + 0.1) |" in text


def test_processes_side_by_side_continue_a_local_run_and_match_it_exactly(tmp_path, reference, capsys):
    f, ref_out, _ = reference
    out = tmp_path / "moved"
    for cell in SEED0:  # seed 0 was run locally; two worker processes (one CPU each) do the rest
        shutil.copytree(ref_out / "cells" / cell, out / "cells" / cell)
    res = run_experiment(f, out, executor="processes", num_cpus=2, progress=False)
    assert res.ok and sorted(res.skipped) == sorted(SEED0) and sorted(res.ran) == sorted(SEED1)
    assert values(out) == values(ref_out)  # same thread count per cell: the same numbers
    # the CLI's default picks the processes executor for 1-CPU cells on a machine with more cores
    shutil.rmtree(out / "cells" / SEED1[-1])
    calls = []
    real = executors.ProcessExecutor.submit
    try:
        executors.ProcessExecutor.submit = lambda self, cell, progress: (calls.append(cell.id), real(self, cell, progress))[1]
        assert main(["run", str(f), "--out", str(out), "--quiet", "--cpus", "2"]) == 0
    finally:
        executors.ProcessExecutor.submit = real
    assert calls == [SEED1[-1]] and values(out) == values(ref_out)


def test_cells_that_others_wait_for_start_first(reference):
    """Clean models, then attacks, then the defense cells (the local executor runs them in start order)."""
    from backdoorlab.experiments.runner import START_ORDER

    kinds = [c.split("/")[0] for c in reference[2].ran]
    assert {"clean", "attack", "defense"} <= set(kinds)
    assert kinds == sorted(kinds, key=START_ORDER.__getitem__)
