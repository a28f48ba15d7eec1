"""Benchmark: the baselines of the MMLM paper (its Tables 2 and 3) and Data-Efficient vs random selection.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_attacks.py --out runs/bench_attacks
    PYTHONPATH=src .venv/bin/python benchmarks/bench_attacks.py --out runs/bench_attacks --datasets mnist5k
    PYTHONPATH=src .venv/bin/python benchmarks/bench_attacks.py --out runs/bench_attacks --datasets fashion-mnist \\
        --epochs fashion-mnist=4 --fus-rounds fashion-mnist=3 --fus-epochs fashion-mnist=2 --low-rates 0.002 --low-seeds 0

Part 1 (Tables 2 and 3): BadNets, Blended, WaNet and Data-Efficient poisoning with ``digit-cnn`` on
each dataset, trained freely (``restrict=none``: from scratch on the poisoned data / under the
attack's control) and restricted to the final layer of the same clean model (``restrict=head``, the
MMLM threat model), at each attack's default parameters (poison rate 0.1, target = the dataset's
default). Reported: clean accuracy of the clean model and of the attacked model, ASR, ASR of the same
poisoned images on the clean model, and the parameter audit (changed parameters, and outside the head).

Part 2: Data-Efficient poisoning (FUS) against random selection (``rounds=0``: FUS's own starting
pool, the same trigger and training) at low poison rates (default 0.5%, 1% and 2%), over several seeds
and base triggers; the table gives the ASR of each and the gain of FUS.

Every run goes through ``backdoorlab.jobs.run_attack`` into its own run directory under ``--out``
(one clean model per dataset, trained once by ``run_train`` and shared by all runs), so an
interrupted benchmark resumes where it stopped; ``results.md`` and ``results.json`` are rewritten
after every run (for the datasets of that invocation). Per-dataset options take ``N`` (all
datasets) or ``DATASET=N`` pairs.

WaNet learns its warp slowly (its authors train for hundreds of epochs): with digit-cnn on mnist5k,
12 epochs leave its ASR near zero, 60 epochs (``--attack-epochs wanet=60``) reach ~98%.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

from backdoorlab.artifacts import dump_json
from backdoorlab.jobs import AttackJob, TrainJob, run_attack, run_train

ATTACKS = ("badnets", "blended", "wanet", "data-efficient")
EPOCHS = {"mnist5k": 12, "fashion-mnist": 4, "*": 10}
FUS_ROUNDS = {"fashion-mnist": 3}  # elsewhere: the attack's default
FUS_EPOCHS = {"fashion-mnist": 2}


def per_dataset(values: list[str] | None, default: dict[str, int]) -> dict[str, int]:
    out = dict(default)
    for v in values or []:
        key, _, n = v.rpartition("=")
        out[key or "*"] = int(n)
    return out


def pick(table: dict[str, int], dataset: str) -> int | None:
    return table.get(dataset, table.get("*"))


def fmt(v: object) -> str:
    """Fractions as percentages with one decimal; counts as they are."""
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if isinstance(v, float) else str(v)


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.out = Path(a.out)
        self.epochs = per_dataset(a.epochs, EPOCHS)
        self.fus_rounds = per_dataset(a.fus_rounds, FUS_ROUNDS)
        self.fus_epochs = per_dataset(a.fus_epochs, FUS_EPOCHS)
        self.attack_epochs = per_dataset(a.attack_epochs, {})
        self.runs: list[dict] = []
        self.low: list[dict] = []

    def train_overrides(self, ds: str, attack: str | None = None) -> dict:
        return {"epochs": self.attack_epochs.get(attack or "", pick(self.epochs, ds))}

    def fus_params(self, ds: str) -> dict:
        p = {"rounds": pick(self.fus_rounds, ds), "select_epochs": pick(self.fus_epochs, ds)}
        return {k: v for k, v in p.items() if v is not None}

    def clean(self, ds: str) -> str:
        d = self.out / ds / "clean"
        job = TrainJob(dataset=ds, model=self.a.model, data_root=self.a.data_root, width=self.a.width, seed=self.a.seed, device=self.a.device, train=self.train_overrides(ds))
        m = run_train(job, d, progress=self.a.progress)
        print(f"[{ds}] clean model: accuracy {m['clean_accuracy']:.4f}", flush=True)
        return str(d / "model.safetensors")

    def attack(self, ds: str, clean: str, name: str, params: dict, folder: str, seed: int | None = None) -> dict:
        job = AttackJob(dataset=ds, model=self.a.model, data_root=self.a.data_root, width=self.a.width, seed=self.a.seed if seed is None else seed,
                        device=self.a.device, train=self.train_overrides(ds, name), attack=name, params=params, clean_model=clean)
        t0 = time.perf_counter()
        m = run_attack(job, self.out / ds / folder, progress=self.a.progress)
        print(f"[{ds}] {folder}: clean {m['clean_accuracy']:.4f}  ASR {m['attack_success_rate']:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        return m

    def run(self) -> None:
        for ds in self.a.datasets:
            clean = self.clean(ds)
            for name in self.a.attacks:
                for restrict in self.a.restricts:
                    params = {"restrict": restrict, **(self.fus_params(ds) if name == "data-efficient" else {})}
                    m = self.attack(ds, clean, name, params, f"{name}-{restrict}")
                    self.runs.append({"dataset": ds, "attack": name, "restrict": restrict, "epochs": self.train_overrides(ds, name)["epochs"], **{k: m.get(k) for k in KEYS}})
                    self.write()
            for rate, trig, seed in itertools.product(self.a.low_rates, self.a.low_triggers, self.a.low_seeds):
                row = {"dataset": ds, "base_trigger": trig, "poison_rate": rate, "seed": seed}
                for label, extra in (("random", {"rounds": 0}), ("fus", self.fus_params(ds))):
                    params = {"poison_rate": rate, "base_trigger": trig, "restrict": "none", **extra}
                    m = self.attack(ds, clean, "data-efficient", params, f"low-{rate:g}-{trig}-{label}-seed{seed}", seed=seed)
                    row.update({f"{label}_asr": m["attack_success_rate"], f"{label}_clean_accuracy": m["clean_accuracy"], "poison_count": m["poison_count"]})
                    if label == "fus":
                        row["fus_rounds"] = len(m["selection_rounds"])
                        row["fus_overlap_with_random"] = m["selection_overlap_with_random"]
                row["asr_gain"] = row["fus_asr"] - row["random_asr"]
                self.low.append(row)
                self.write()

    def summary(self) -> list[dict]:
        """Mean over seeds per (dataset, poison rate, base trigger)."""
        out = []
        for key in dict.fromkeys((r["dataset"], r["poison_rate"], r["base_trigger"]) for r in self.low):
            rows = [r for r in self.low if (r["dataset"], r["poison_rate"], r["base_trigger"]) == key]
            mean = lambda k: statistics.fmean(r[k] for r in rows)  # noqa: E731
            out.append({"dataset": key[0], "poison_rate": key[1], "base_trigger": key[2], "poison_count": rows[0]["poison_count"], "seeds": len(rows),
                        "random_asr": mean("random_asr"), "fus_asr": mean("fus_asr"), "asr_gain": mean("asr_gain"), "fus_wins": sum(r["asr_gain"] > 0 for r in rows)})
        return out

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(dump_json({"config": vars(self.a), "runs": self.runs, "low_rate": self.low, "low_rate_summary": self.summary()}))
        (self.out / "results.md").write_text(self.markdown())

    def markdown(self) -> str:
        lines = ["# MMLM baselines: free (Table 2) and final-layer-only (Table 3)", "",
                 f"Model `{self.a.model}` (width {self.a.width}), seed {self.a.seed}; accuracies and ASR in %. "
                 "`restrict=head`: only the final layer of the clean model is trained (MMLM's threat model).", ""]
        head = "| dataset | attack | restrict | epochs | clean acc (clean model) | clean acc | ASR | ASR on clean model | changed params | changed outside head |"
        lines += [head, "|---" * (head.count("|") - 1) + "|"]
        for r in self.runs:
            lines.append(f"| {r['dataset']} | {r['attack']} | {r['restrict']} | {r['epochs']} | {fmt(r['clean_accuracy_before'])} | {fmt(r['clean_accuracy'])} | "
                         f"{fmt(r['attack_success_rate'])} | {fmt(r['attack_success_rate_clean_model'])} | {fmt(r['changed_parameters'])} | {fmt(r['changed_parameters_outside_head'])} |")
        if self.low:
            lines += ["", "# Data-Efficient (FUS) vs random selection at low poison rates", "",
                      "Random = FUS's own starting pool (`rounds=0`), same trigger and training; FUS gain = FUS ASR - random ASR.", "",
                      "| dataset | rate | base trigger | seed | poisoned | random ASR | FUS ASR | gain | random clean acc | FUS clean acc | FUS pool overlap with random |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in self.low:
                lines.append(f"| {r['dataset']} | {r['poison_rate']:g} | {r['base_trigger']} | {r['seed']} | {r['poison_count']} | {fmt(r['random_asr'])} | {fmt(r['fus_asr'])} | "
                             f"{100 * r['asr_gain']:+.1f} | {fmt(r['random_clean_accuracy'])} | {fmt(r['fus_clean_accuracy'])} | {fmt(r['fus_overlap_with_random'])} |")
            lines += ["", "| dataset | rate | base trigger | poisoned | seeds | mean random ASR | mean FUS ASR | mean gain | FUS better in |", "|---|---|---|---|---|---|---|---|---|"]
            for s in self.summary():
                lines.append(f"| {s['dataset']} | {s['poison_rate']:g} | {s['base_trigger']} | {s['poison_count']} | {s['seeds']} | {fmt(s['random_asr'])} | {fmt(s['fus_asr'])} | "
                             f"{100 * s['asr_gain']:+.1f} | {s['fus_wins']}/{s['seeds']} |")
        return "\n".join(lines) + "\n"


KEYS = ("clean_accuracy_before", "clean_accuracy", "attack_success_rate", "attack_success_rate_clean_model", "changed_parameters",
        "changed_parameters_outside_head", "outside_head_bitwise_equal", "noise_mode_accuracy", "selection_overlap_with_random", "seconds")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the run directories and results.md / results.json")
    p.add_argument("--datasets", nargs="+", default=["mnist5k", "fashion-mnist"])
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    p.add_argument("--restricts", nargs="+", default=["none", "head"], choices=["none", "finetune", "head"])
    p.add_argument("--model", default="digit-cnn")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", nargs="+", metavar="[DATASET=]N", help=f"training epochs (default {EPOCHS})")
    p.add_argument("--attack-epochs", nargs="+", metavar="ATTACK=N", help="victim epochs for one attack (e.g. wanet=100: WaNet learns its warp slowly); the clean model keeps --epochs")
    p.add_argument("--fus-rounds", nargs="+", metavar="[DATASET=]N", help=f"FUS rounds (default: the attack's, {FUS_ROUNDS} here)")
    p.add_argument("--fus-epochs", nargs="+", metavar="[DATASET=]N", help=f"epochs per FUS round (default: the attack's, {FUS_EPOCHS} here)")
    p.add_argument("--low-rates", nargs="*", type=float, default=[0.005, 0.01, 0.02], help="poison rates of the FUS vs random comparison")
    p.add_argument("--low-seeds", nargs="*", type=int, default=[0, 1, 2], help="seeds of the comparison (none: skip it)")
    p.add_argument("--low-triggers", nargs="*", default=["badnets", "blended"], choices=["badnets", "blended"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these small models on a shared machine)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    bench = Bench(a)
    t0 = time.perf_counter()
    bench.run()
    bench.write()
    print(bench.markdown())
    print(f"wrote {bench.out / 'results.md'} and results.json in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
