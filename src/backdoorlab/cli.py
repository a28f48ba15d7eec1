"""Command line: ``backdoorlab datasets|models|attacks|defenses|train|attack ...``.

Each sub-command is registered with its handler; configs are validated before any work starts,
and a ``BackdoorLabError`` is printed as one clear line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import BackdoorLabError

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(fn: Callable[[argparse._SubParsersAction], None]) -> Callable:
    COMMANDS.append(fn)
    return fn


def parse_pairs(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """``key=value`` pairs; values are read as YAML scalars/lists (3, 0.1, true, [1,2])."""
    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise BackdoorLabError(f"{flag} expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def _print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


@command
def _datasets(sub: argparse._SubParsersAction) -> None:
    def handler(a: argparse.Namespace) -> int:
        from .data import DATASETS

        rows = [(n, "x".join(map(str, e.spec.shape)), str(e.spec.num_classes), e.default_root or ("--data-root" if e.needs_root else "embedded"), e.spec.description) for n, e in DATASETS.items()]
        _print_table(rows, ("name", "shape", "classes", "source", "description"))
        return 0

    sub.add_parser("datasets", help="list datasets").set_defaults(func=handler)


@command
def _models(sub: argparse._SubParsersAction) -> None:
    def handler(a: argparse.Namespace) -> int:
        from .models import MODELS

        rows = [(n, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "") for n, fn in MODELS.items()]
        _print_table(rows, ("name", "description"))
        return 0

    sub.add_parser("models", help="list models").set_defaults(func=handler)


@command
def _attacks(sub: argparse._SubParsersAction) -> None:
    def handler(a: argparse.Namespace) -> int:
        from .attacks import ATTACKS

        recipe = lambda c: "; ".join(f"{d}: " + ", ".join(f"{k} {v}" for k, v in r.items()) for d, r in c.recipe.items()) or "-"  # noqa: E731

        def default(c: Any, key: str) -> str:  # a default poison rate (%) or L∞ budget (/255), "-" where the attack has none
            v = getattr(c.Params(), key, None)
            return "-" if v is None else f"{100 * v:g}%" if key == "poison_rate" else f"{255 * v:.3g}/255"

        _print_table([(n, c.kind.value, recipe(c), default(c, "poison_rate"), default(c, "epsilon"), c.paper) for n, c in ATTACKS.items()],
                     ("name", "kind", "default recipe", "poison rate", "epsilon", "paper"))
        return 0

    sub.add_parser("attacks", help="list attacks").set_defaults(func=handler)


@command
def _defenses(sub: argparse._SubParsersAction) -> None:
    def handler(a: argparse.Namespace) -> int:
        from .defenses import DEFENSES

        _print_table([(n, getattr(c, "kind", ""), getattr(c, "paper", "")) for n, c in DEFENSES.items()], ("name", "kind", "paper"))
        return 0

    sub.add_parser("defenses", help="list defenses").set_defaults(func=handler)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--model", default="digit-cnn")
    p.add_argument("--data-root", default=None, help="folder with the dataset's official files")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier of the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--train", action="append", metavar="KEY=VALUE", help="any TrainConfig field, e.g. --train schedule=step")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--force", action="store_true", help="redo a finished run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_overrides(a: argparse.Namespace) -> dict[str, Any]:
    t = parse_pairs(a.train, "--train")
    t.update({k: v for k, v in (("epochs", a.epochs), ("lr", a.lr), ("batch_size", a.batch_size)) if v is not None})
    return t


def _print_metrics(m: dict, keys: list[str]) -> None:
    rows = []
    for k in keys:
        if k in m and m[k] is not None:
            v = m[k]
            rows.append((k, f"{v:.4f}" if isinstance(v, float) else str(v)))
    _print_table(rows, ("metric", "value"))


@command
def _train(sub: argparse._SubParsersAction) -> None:
    def handler(a: argparse.Namespace) -> int:
        from .jobs import TrainJob, run_train

        job = TrainJob(a.dataset, a.model, a.data_root, a.width, a.seed, a.device, _train_overrides(a))
        m = run_train(job, a.out, progress=not a.quiet, force=a.force)
        _print_metrics(m, ["clean_accuracy", "train_seconds", "images_per_second"])
        return 0

    p = sub.add_parser("train", help="train a clean model")
    _common(p)
    p.set_defaults(func=handler)


ATTACK_KEYS = ["clean_accuracy_before", "clean_accuracy", "attack_success_rate", "attack_success_rate_clean_model", "changed_parameters", "changed_parameters_outside_head", "mean_perturbation_linf", "mean_perturbation_l2", "ssim", "psnr", "ot_grad_norm", "seconds"]


@command
def _attack(sub: argparse._SubParsersAction) -> None:
    def handler(a: argparse.Namespace) -> int:
        from .jobs import AttackJob, run_attack

        params = parse_pairs(a.param, "--param")
        for key in ("target", "target_mode", "poison_rate", "restrict", "epsilon"):
            v = getattr(a, key)
            if v is not None:
                params[key] = v
        job = AttackJob(a.dataset, a.model, a.data_root, a.width, a.seed, a.device, _train_overrides(a), a.name, params, a.clean_model, cache_dir=a.cache_dir)
        m = run_attack(job, a.out, progress=not a.quiet, force=a.force)
        _print_metrics(m, ATTACK_KEYS + [k for k in m if k.startswith("required_perturbation")] + ["asr90_epsilon"])
        if m.get("asr_curve"):
            print("\nASR versus ε (the same crafted images on the backdoored and on the clean model)")
            _print_table([(f"{c['epsilon']:.4f}", f"{255 * c['epsilon']:.0f}/255", f"{c['attack_success_rate']:.4f}", f"{c['attack_success_rate_clean_model']:.4f}") for c in m["asr_curve"]],
                         ("epsilon", "in pixels", "asr_backdoored", "asr_clean_model"))
            if m.get("attack_success_rate", 0) < 0.9:
                e90 = m.get("asr90_epsilon")
                print(f"\nnote: the ASR at ε = {255 * m['epsilon']:.0f}/255 is {m['attack_success_rate']:.1%}; " + (
                    f"it reaches 90% at ε = {255 * e90:.0f}/255 on this model: rerun with --epsilon {e90:.4f} to deliver images there" if e90 is not None
                    else "no budget of the curve reaches 90% on this model: add larger curve_epsilons"))
        if a.json:
            print(json.dumps({k: m[k] for k in ATTACK_KEYS if k in m}))
        return 0

    p = sub.add_parser("attack", help="run an attack: backdoorlab attack NAME --out DIR")
    p.add_argument("name")
    _common(p)
    p.add_argument("--target", type=int, default=None)
    p.add_argument("--target-mode", choices=["all-to-one", "all-to-all"], default=None)
    p.add_argument("--poison-rate", type=float, default=None)
    p.add_argument("--restrict", default=None, help="none | finetune | head (train only the final layer of the clean model)")
    p.add_argument("--epsilon", type=float, default=None, help="L∞ budget in [0,1] for attacks that have one")
    p.add_argument("--clean-model", default=None, help="clean model file to start from")
    p.add_argument("--cache-dir", default=None, help="share input-only work between runs here (MMLM's OT per clean model); results are the same without it")
    p.add_argument("--param", "-p", action="append", metavar="KEY=VALUE", help="any attack parameter")
    p.add_argument("--json", action="store_true", help="also print the headline metrics as JSON")
    p.set_defaults(func=handler)


@command
def _run(sub: argparse._SubParsersAction) -> None:
    def handler(a: argparse.Namespace) -> int:
        from .experiments import prepare, run_experiment
        from .experiments.runner import dropped_cells

        if a.dry_run:
            grid = prepare(a.file, a.out)
            _print_table([(c.id, c.kind, "finished" if c.finished else "to run", ",".join(c.deps)) for c in grid], ("cell", "kind", "state", "needs"))
            print(f"{len(grid)} cells, {sum(not c.finished for c in grid)} to run; the file is valid")
            gone = dropped_cells(grid)
            if gone:
                print(f"note: {a.out} holds results of {len(gone)} cell(s) this file does not have; a run here needs --drop-missing to drop them")
            return 0
        res = run_experiment(a.file, a.out, a.executor, a.address, progress=not a.quiet, num_cpus=a.ray_cpus, drop_missing=a.drop_missing)
        if res.report is not None and Path(res.report).exists():  # the tables, without the figure section
            print("\n" + Path(res.report).read_text().split("\n## Figures", 1)[0].rstrip() + "\n")
        print(f"ran {len(res.ran)}, already finished {len(res.skipped)}, failed {len(res.failed)}, skipped after a failure {len(res.blocked)}")
        print(f"table: {res.table}\nreport: {res.report}")
        for cid in res.failed:
            print(f"failed: {cid} (see {res.out / 'cells' / cid / 'error.txt'})", file=sys.stderr)
        return 0 if res.ok else 1

    p = sub.add_parser("run", help="run an experiment file: backdoorlab run experiments/mmlm-small.yaml --out DIR")
    p.add_argument("file", help="experiment YAML file")
    p.add_argument("--out", required=True, help="output folder (cells/, results.jsonl, report.md); run again to resume")
    p.add_argument("--executor", default="auto", help="auto (processes when two cells fit in this machine's CPUs at once, else local), "
                   "local (one cell at a time in this process), processes (cells side by side in worker processes) or ray (cells as Ray tasks)")
    p.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto or ray://host:10001); default: start a local instance")
    p.add_argument("--ray-cpus", "--cpus", type=int, default=None, help="CPUs the processes executor or a locally started Ray instance uses (default: all)")
    p.add_argument("--dry-run", action="store_true", help="check the file and list the cells, run nothing")
    p.add_argument("--drop-missing", action="store_true", help="allow this file to drop the results of cells it no longer has from --out")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=handler)


@command
def _defend(sub: argparse._SubParsersAction) -> None:
    def handler(a: argparse.Namespace) -> int:
        from .defenses import DEFENSES, DefenseJob, run_defense

        job = DefenseJob(a.name, a.run, a.model, a.heldout_fraction, a.heldout_seed, a.seed, a.device, parse_pairs(a.param, "--param"), a.max_inputs, a.cache_dir,
                         inspect_poison_rate=a.inspect_poison_rate)
        m = run_defense(job, a.out, progress=not a.quiet, force=a.force)
        scalars = {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool)) or v is None}
        lists = [k for k in DEFENSES.get(a.name).headline if k not in scalars]
        _print_metrics(m, [k for k in scalars if k != "paper"] + lists)
        if a.json:
            print(json.dumps(scalars))
        return 0

    p = sub.add_parser("defend", help="run a defense on an attack run: backdoorlab defend NAME --run DIR --out DIR2")
    p.add_argument("name")
    p.add_argument("--run", required=True, help="attack run directory (from backdoorlab attack)")
    p.add_argument("--out", required=True, help="defense run directory")
    p.add_argument("--model", choices=["backdoored", "clean"], default="backdoored", help="inspect the run's backdoored model or its clean model (false-positive check)")
    p.add_argument("--heldout-fraction", type=float, default=0.2, help="stratified fraction of the test split given to the defender as clean data; the rest scores the defense")
    p.add_argument("--heldout-seed", type=int, default=0)
    p.add_argument("--max-inputs", type=int, default=1000, help="clean and poisoned test-time inputs presented to the defense, each (0 = all)")
    p.add_argument("--inspect-poison-rate", type=float, default=None,
                   help="for an attack that delivers no training set (wb, lira): inspect the training set with this share poisoned by its trigger")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--param", "-p", action="append", metavar="KEY=VALUE", help="any defense parameter")
    p.add_argument("--force", action="store_true", help="redo a finished run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="also print the scalar metrics as JSON")
    p.add_argument("--cache-dir", default=None, help="share work that depends only on the defender's data between runs here (MNTD's shadow set); results are the same without it")
    p.set_defaults(func=handler)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="backdoorlab", description="Backdoor attacks and defenses for image classifiers.")
    parser.add_argument("--version", action="version", version=f"backdoorlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its line")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Any error this toolkit raises on purpose (a bad value, file, device or
    folder) is printed as one line naming the field and the value, exit code 2; ``--debug`` shows
    the traceback too."""
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return int(a.func(a) or 0)
    except BackdoorLabError as e:
        if a.debug:
            raise
        print(f"backdoorlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
