"""Benchmark: every attack's default command on MNIST-5k (issue 17, "defaults that work").

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_defaults.py --out runs/bench_defaults
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_defaults.py --out runs/bench_defaults --attacks wanet,siba

For every registered attack (``backdoorlab.attacks.ATTACKS``) it runs what a new user's
``backdoorlab attack NAME --dataset mnist5k --seed 0 --out OUT/NAME`` runs: an ``AttackJob`` with
only the dataset, seed and attack name set (so the attack's default parameters and its default
training recipe, ``Attack.recipe_for(dataset)``), through ``backdoorlab.jobs.run_attack``.

Two things differ from typing the command 14 times, neither changes a figure:

- a shared ``cache_dir`` (``OUT/cache``): surrogates and triggers of the SIBA family and MMLM's OT
  are computed once (the CLI's ``--cache-dir``; a cache only saves time, the config is the same);
- the clean model: the first run of each training recipe trains it exactly as the command does
  (inside its run, for the audit, or as MMLM's starting point); it is copied to ``OUT/cache`` and
  later runs of the same recipe, dataset, model and seed are given that file (``--clean-model``),
  which is the same model bit for bit (the trainer seeds itself; same seed, recipe and thread
  count). A transfer attack (Latent Backdoor) starts from a teacher of its own and is never given
  one. ``clean_model_reused`` in the table says which runs got it; their wall time excludes it.

Resumable: a run whose ``metrics.json`` exists is read, not redone; a run another invocation is
running (``OUT/locks/NAME.pid``, a live process) is skipped. ``results.json`` and
``results.md`` are rewritten after every run from every finished run under ``--out`` (so several
invocations with disjoint ``--attacks`` may share one ``--out``).

"reaches 90%": the attack's headline success rate at its defaults is >= 90%: the targeted ASR,
or for UBW-P (an untargeted watermark) the untargeted rate (triggered test images not classified
as their own class, its paper's ASR-A); for MMLM, if its default ε falls short, "yes at ε" when
``asr90_epsilon`` (the smallest budget of its ASR-versus-ε curve reaching 90%) exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from backdoorlab.artifacts import dump_json
from backdoorlab.attacks import ATTACKS
from backdoorlab.jobs import AttackJob, run_attack

DATASET = "mnist5k"


def pct(v: object) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def headline(name: str, m: dict) -> tuple[str, float]:
    """Which success rate the attack claims, and its value."""
    if name == "ubw-p":
        return "untargeted", m["untargeted_attack_success_rate"]
    return "targeted", m["attack_success_rate"]


def reaches(name: str, m: dict) -> str:
    _, asr = headline(name, m)
    if asr >= 0.9:
        return "yes"
    e90 = m.get("asr90_epsilon")
    if e90 is not None:
        return f"yes at ε = {255 * e90:.0f}/255"
    return "no"


def defaults(name: str) -> dict:
    """The attack's default recipe on MNIST-5k and its default poison rate / ε."""
    cls = ATTACKS.get(name)
    p = cls.Params()
    return {"recipe": cls.recipe_for(DATASET), "poison_rate": getattr(p, "poison_rate", None), "epsilon": getattr(p, "epsilon", None)}


class Bench:
    def __init__(self, out: Path, seed: int) -> None:
        self.out, self.seed = out, seed
        self.cache = out / "cache"

    def job(self, name: str) -> AttackJob:
        return AttackJob(dataset=DATASET, seed=self.seed, attack=name, cache_dir=str(self.cache))

    def clean_key(self, job: AttackJob) -> str:
        cfg = job.config()
        key = repr((cfg["dataset"], cfg["model"], cfg["width"], cfg["seed"], sorted(cfg["train"].items())))
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def run(self, name: str) -> None:
        d = self.out / name
        if (d / "metrics.json").exists():
            print(f"{name}: finished earlier, kept")
            return
        lock = self.out / "locks" / f"{name}.pid"
        if lock.exists() and Path(f"/proc/{lock.read_text().strip()}").exists():
            print(f"{name}: being run by process {lock.read_text().strip()}, skipped")
            return
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(str(os.getpid()))
        try:
            self._run(name, d)
        finally:
            lock.unlink(missing_ok=True)

    def _run(self, name: str, d: Path) -> None:
        job = self.job(name)
        shared = self.cache / f"clean-{self.clean_key(job)}.safetensors"
        cfg_path = d / "config.json"
        if cfg_path.exists():  # an interrupted run resumes with the clean model it started with
            job.clean_model = json.loads(cfg_path.read_text()).get("clean_model")
        elif ATTACKS.get(name).starts_from_clean_model and shared.exists():
            job.clean_model = str(shared)
        print(f"{name}: running (clean model {'given: ' + job.clean_model if job.clean_model else 'trained in the run'})", flush=True)
        t0 = time.perf_counter()
        run_attack(job, d, progress=False)
        wall = time.perf_counter() - t0
        own = d / "clean_model.safetensors"
        if job.clean_model is None and own.exists() and ATTACKS.get(name).starts_from_clean_model and not shared.exists():
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = shared.with_suffix(".tmp")
            shutil.copyfile(own, tmp)
            tmp.replace(shared)
        (d / "bench_wall.json").write_text(json.dumps({"wall_seconds": wall, "clean_model_reused": job.clean_model is not None}))

    def rows(self) -> list[dict]:
        rows = []
        for name in ATTACKS.names():
            d = self.out / name
            if not (d / "metrics.json").exists():
                continue
            m = json.loads((d / "metrics.json").read_text())
            cfg = json.loads((d / "config.json").read_text())
            extra = json.loads((d / "bench_wall.json").read_text()) if (d / "bench_wall.json").exists() else {}
            kind, asr = headline(name, m)
            rows.append({
                "attack": name, **defaults(name), "epochs": cfg["train"]["epochs"],
                "clean_accuracy": m["clean_accuracy"], "clean_accuracy_before": m.get("clean_accuracy_before"),
                "attack_success_rate": m["attack_success_rate"],
                "attack_success_rate_clean_model": m.get("attack_success_rate_clean_model"),
                "untargeted_attack_success_rate": m.get("untargeted_attack_success_rate"),
                "untargeted_attack_success_rate_clean_model": m.get("untargeted_attack_success_rate_clean_model"),
                "headline": kind, "headline_asr": asr,
                "asr90_epsilon": m.get("asr90_epsilon"), "reaches_90": reaches(name, m),
                "seconds": m.get("seconds"), "wall_seconds": extra.get("wall_seconds"), "clean_model_reused": extra.get("clean_model_reused"),
            })
        return rows

    def write(self) -> None:
        rows = self.rows()
        (self.out / "results.json").write_text(dump_json({"dataset": DATASET, "seed": self.seed, "runs": rows}))
        lines = [f"# Every attack's default command on {DATASET} (seed {self.seed})", "",
                 "`backdoorlab attack NAME --dataset mnist5k --seed 0 --out OUT/NAME`; ASR in %, the clean model's accuracy in parentheses.", "",
                 "| attack | default recipe | epochs | poison rate | ε | clean acc (clean model) | ASR | ASR on clean model | ASR90 ε | reaches 90% | wall s | clean model reused |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            recipe = ", ".join(f"{k} {v}" for k, v in r["recipe"].items()) or "-"
            eps = "-" if r["epsilon"] is None else f"{255 * r['epsilon']:.0f}/255"
            asr = pct(r["attack_success_rate"]) + (f" (untargeted {pct(r['untargeted_attack_success_rate'])})" if r["headline"] == "untargeted" else "")
            asr_clean = pct(r["attack_success_rate_clean_model"]) + (f" (untargeted {pct(r['untargeted_attack_success_rate_clean_model'])})" if r["headline"] == "untargeted" else "")
            e90 = "-" if r["asr90_epsilon"] is None else f"{255 * r['asr90_epsilon']:.0f}/255"
            wall = "-" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}"
            lines.append(f"| {r['attack']} | {recipe} | {r['epochs']} | {pct(r['poison_rate'])} | {eps} | {pct(r['clean_accuracy'])} ({pct(r['clean_accuracy_before'])}) | "
                         f"{asr} | {asr_clean} | {e90} | {r['reaches_90']} | {wall} | {'yes' if r['clean_model_reused'] else 'no'} |")
        (self.out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--attacks", default=None, help="comma-separated subset (default: every registered attack)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    names = a.attacks.split(",") if a.attacks else list(ATTACKS.names())
    for n in names:
        ATTACKS.get(n)  # an unknown name fails before any work
    bench = Bench(Path(a.out), a.seed)
    bench.out.mkdir(parents=True, exist_ok=True)
    for n in names:
        bench.run(n)
        bench.write()
    bench.write()
    print((bench.out / "results.md").read_text())


if __name__ == "__main__":
    main()
