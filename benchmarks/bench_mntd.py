"""Benchmark: MNTD's AUROC between clean and BadNets suspect models of one architecture, and its costs.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_mntd.py --run RUN --out OUT \\
        [--suspects 6] [--epochs 3] [--suspect-data train|heldout|train-subset] [--heldout-fraction 0.2] \\
        [--cache-dir DIR] [-p KEY=VALUE ...] [--seed 0] [--threads 1]

MNTD is fitted on RUN's defender view (the defender's clean held-out data, the run's architecture;
the shadow set cached in --cache-dir, default OUT/cache). Then --suspects clean and --suspects
backdoored suspect models of the same architecture are trained on the run's clean training set
with the dataset's recipe for --epochs epochs (``--suspect-data heldout``: on the defender's held-out
data, as the shadows are; ``--suspect-data train-subset``: on a stratified subset of the run's
training set as large as the defender's held-out data, i.e. the shadows' recipe on other images;
``--heldout-fraction``: the defender's share of the test split): the backdoored ones with RUN's own trigger, target
and poison rate (BadNets: the attacker's patch), seeds apart from the shadows'. Neither kind is
ever seen by the meta-classifier. Reported (OUT/mntd.json, OUT/mntd_scores.png): the suspects'
clean accuracy and ASR, their meta scores, the AUROC (BadNets = positive), the score of RUN's own
backdoored and clean models, and the seconds for the shadow set (or its cache hit), the
meta-classifier and the scoring of all suspects.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from backdoorlab.attacks.triggers import MaskPatternTrigger
from backdoorlab.artifacts import RunDir, dump_json
from backdoorlab.cli import parse_pairs
from backdoorlab.data import load_dataset
from backdoorlab.data.subset import stratified_indices
from backdoorlab.defenses.mntd import MNTD, MNTDParams, meta_scores, train_models
from backdoorlab.defenses.view import load_case
from backdoorlab.metrics.ranking import auroc
from backdoorlab.models import build_model
from backdoorlab.plots import histograms
from backdoorlab.validate import build_params


def study(run: Path, out: Path, suspects: int = 6, epochs: int = 3, params: dict | None = None, cache_dir: Path | None = None, seed: int = 0, suspect_data: str = "train",
          heldout_fraction: float = 0.2) -> dict:
    view, truth = load_case(run, heldout_fraction=heldout_fraction, seed=seed)
    view.cache_dir = cache_dir or out / "cache"
    defense = MNTD(build_params(MNTDParams, dict(params or {})))
    defense.validate()
    t0 = time.perf_counter()
    meta, rec = defense.fit(view)
    t_fit = time.perf_counter() - t0
    cfg = RunDir(run).read_config()
    data = load_dataset(cfg["dataset"], cfg.get("data_root"))
    trig = truth.trigger
    if not isinstance(trig, MaskPatternTrigger):
        raise SystemExit(f"{run}: the suspects need a mask-pattern trigger (BadNets, Blended), not {type(trig).__name__}")
    n, arch = 2 * suspects, view.model.arch
    stacked = MaskPatternTrigger(trig.mask.cpu().expand(n, 1, *trig.mask.shape), trig.pattern.cpu().expand(n, 1, *trig.pattern.shape))
    rates = torch.tensor([0.0] * suspects + [float(cfg["params"].get("poison_rate", 0.1))] * suspects)
    t1 = time.perf_counter()
    train_set = {"train": data.train, "heldout": view.heldout}.get(suspect_data)
    if train_set is None:  # train-subset: the shadows' data size, images the defender never holds
        train_set = data.train.subset(stratified_indices(data.train.y, len(view.heldout), 20_000 + seed))
    state = train_models(arch, train_set, data.spec, epochs, defense.p.shadow_batch, stacked, torch.full((n,), truth.target), rates, 10_000 + seed, view.device, desc="suspects")
    t_suspects = time.perf_counter() - t1
    models = []
    for i in range(n):
        m = build_model(arch).to(view.device)
        m.load_state_dict({k: v[i] for k, v in state.items()})
        models.append(m.eval())
    t2 = time.perf_counter()
    scores = meta_scores(meta, arch, models)
    t_score = time.perf_counter() - t2
    run_models = meta_scores(meta, arch, [view.model, RunDir(run).load_model("clean_model.safetensors", view.device)])
    result = {
        "run": str(run), "suspect_data": suspect_data, "suspect_train_size": len(train_set), "heldout_size": len(view.heldout), "suspects_per_kind": suspects, "suspect_epochs": epochs, "params": vars(defense.p), "seed": seed,
        "auroc": auroc(scores[:suspects], scores[suspects:]),
        "scores_clean": scores[:suspects].tolist(), "scores_backdoored": scores[suspects:].tolist(),
        "suspect_clean_accuracy": [truth.clean_accuracy(m) for m in models],
        "suspect_asr": [truth.attack_success_rate(m) for m in models],
        "run_backdoored_score": float(run_models[0]), "run_clean_score": float(run_models[1]),
        "shadow_reused": rec["shadow_reused"], "meta_train_accuracy": rec["meta_train_accuracy"],
        "seconds_fit": t_fit, "seconds_suspects": t_suspects, "seconds_score_all": t_score,
        "parameters_per_model": sum(p.numel() for p in view.model.parameters()),
    }
    out.mkdir(parents=True, exist_ok=True)
    histograms({"clean suspects": scores[:suspects], "BadNets suspects": scores[suspects:], "clean shadows": rec["shadow_scores"][rec["shadow_labels"] == 0],
                "jumbo shadows": rec["shadow_scores"][rec["shadow_labels"] == 1]}, out / "mntd_scores.png", "meta-classifier score (backdoored)",
               title=f"MNTD: AUROC {result['auroc']:.3f} over {suspects}+{suspects} suspects", bins=20)
    (out / "mntd.json").write_text(dump_json(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished BadNets (mask-pattern trigger) attack run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--suspects", type=int, default=6, help="clean and BadNets suspect models, each")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of each suspect")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--suspect-data", choices=["train", "heldout", "train-subset"], default="train",
                    help="train the suspects on the run's training set, on the defender's held-out data as the shadows are, "
                         "or on a stratified subset of the training set of the held-out data's size")
    ap.add_argument("--heldout-fraction", type=float, default=0.2, help="the defender's stratified share of the test split")
    ap.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE", help="an MNTD parameter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    r = study(Path(a.run), Path(a.out), a.suspects, a.epochs, parse_pairs(a.param, "--param"), Path(a.cache_dir) if a.cache_dir else None, a.seed, a.suspect_data, a.heldout_fraction)
    print(json.dumps({k: v for k, v in r.items() if not isinstance(v, list)}, indent=1))


if __name__ == "__main__":
    main()
