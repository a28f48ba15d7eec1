"""Benchmark: every registered defense against attack runs; headline numbers and wall time.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_defenses.py --out /tmp/bench-defenses \
        [--datasets mnist5k fashion-mnist] [--poison-rates 0.1 0.05] [--runs DIR ...] \
        [--defenses NAME ...] [--param DEFENSE:KEY=VALUE ...] [--threads T] [--force]

For each dataset it makes (or reuses) a BadNets run with the dataset's default recipe, target 0,
at each poison rate (the 10% run trains the clean model; the other rates reuse it), then runs every
defense on every run with its defaults, on the backdoored model, and Neural Cleanse also on the
run's clean model (the false-positive check). ``--runs`` adds any finished attack run directories
(e.g. MMLM runs); ``--datasets`` with no names makes no BadNets runs. Writes OUT/defenses.md (a
markdown table) and OUT/defenses.json; each defense run lives in OUT/defended/<run>/<defense>-<model>/
with its metrics.json and plot; MNTD's shadow sets are cached in OUT/cache. Finished runs are reused unless --force. On a shared CPU, many
small multi-threaded ops suffer from oversubscription: compare with ``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from backdoorlab.cli import parse_pairs
from backdoorlab.defenses import DEFENSES, DefenseJob, run_defense
from backdoorlab.jobs import AttackJob, run_attack
from backdoorlab.validate import build_params

CLEAN_CHECK = ("neural-cleanse", "mntd")  # defenses also run on the run's clean model


def badnets_runs(out: Path, datasets: list[str], rates: list[float], progress: bool) -> list[Path]:
    runs = []
    for ds in datasets:
        first = out / "runs" / f"{ds}-badnets-{round(100 * rates[0])}"
        for i, rate in enumerate(rates):
            path = out / "runs" / f"{ds}-badnets-{round(100 * rate)}"
            clean = str(first / "clean_model.safetensors") if i else None
            t0 = time.perf_counter()
            m = run_attack(AttackJob(ds, "digit-cnn", attack="badnets", params={"poison_rate": rate}, clean_model=clean), path, progress=progress)
            print(f"[attack] {path.name}: clean acc {m['clean_accuracy']:.4f}, ASR {m['attack_success_rate']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
            runs.append(path)
    return runs


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return "—" if v is None else str(v)


def run_labels(runs: list[Path]) -> list[str]:
    """A distinct name per run: its folder name, or as many trailing path parts as make the names
    distinct (grid cells all end in ``s0``, ``s1``...)."""
    parts = [r.resolve().parts for r in runs]
    for k in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["-".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}-{r.name}" for i, r in enumerate(runs)]  # the same folder given twice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--datasets", nargs="*", default=["mnist5k"])
    ap.add_argument("--poison-rates", nargs="+", type=float, default=[0.1])
    ap.add_argument("--runs", nargs="*", default=[], help="more finished attack run directories (e.g. MMLM)")
    ap.add_argument("--defenses", nargs="*", default=None, help="default: every registered defense")
    ap.add_argument("--param", "-p", action="append", default=[], metavar="DEFENSE:KEY=VALUE", help="a defense parameter, e.g. neural-cleanse:max_images=500")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="redo finished defense runs")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    names = a.defenses or DEFENSES.names()
    params: dict[str, dict] = {n: {} for n in names}
    for item in a.param:
        name, _, pair = item.partition(":")
        DEFENSES.get(name)
        params.setdefault(name, {}).update(parse_pairs([pair], "--param"))
    for n in names:  # fail early on a typo or a bad value
        cls = DEFENSES.get(n)
        cls(build_params(cls.Params, params[n], prefix=f"{n}:")).validate()
    runs = badnets_runs(out, a.datasets, a.poison_rates, a.progress) + [Path(r) for r in a.runs]
    records = []
    for run, label in zip(runs, run_labels(runs)):
        acfg = json.loads((run / "config.json").read_text())
        for name in names:
            for model in ("backdoored", "clean") if name in CLEAN_CHECK and (run / "clean_model.safetensors").exists() else ("backdoored",):
                t0 = time.perf_counter()
                m = run_defense(DefenseJob(name, str(run), model, params=params[name], cache_dir=str(out / "cache")), out / "defended" / label / f"{name}-{model}", progress=a.progress, force=a.force)
                wall = time.perf_counter() - t0
                rec = {
                    "run": label, "attack": acfg["attack"], "dataset": acfg["dataset"], "poison_rate": acfg["params"].get("poison_rate"),
                    "defense": name, "kind": m["kind"], "model": model, "seconds": m["seconds"], "params": params[name],
                    "clean_accuracy_before": m["clean_accuracy_before"], "attack_success_rate_before": m["attack_success_rate_before"],
                    "headline": {k: m.get(k) for k in DEFENSES.get(name).headline},
                }
                records.append(rec)
                print(f"[{label}] {name} ({model}): " + ", ".join(f"{k} {fmt(v)}" for k, v in rec["headline"].items()) + f"  ({wall:.0f}s)", flush=True)
    env = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    lines = [
        f"# Defenses ({env['threads']} thread(s), torch {env['torch']}, {env['cpu']})", "",
        "Defender's data: a fixed stratified 20% of the test split (seed 0); every score below is on the other 80%.", "",
        "| run | defense | model | acc / ASR before | headline | seconds |", "|---|---|---|---|---|---|",
    ]
    for r in records:
        head = "; ".join(f"{k} {fmt(v)}" for k, v in r["headline"].items())
        lines.append(f"| {r['run']} | {r['defense']} | {r['model']} | {r['clean_accuracy_before']:.3f} / {r['attack_success_rate_before']:.3f} | {head} | {r['seconds']:.1f} |")
    (out / "defenses.md").write_text("\n".join(lines) + "\n")
    (out / "defenses.json").write_text(json.dumps({"env": env, "records": records}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
