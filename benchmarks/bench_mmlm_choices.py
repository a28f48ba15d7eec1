"""MMLM's code-selection and crafting choices for one target, measured on the attacker's own images
beside the test set (issue 19).

For one clean model, target and seed, the run's OT, codes and backdoored head are built once by
``MMLM.plant``, the step ``backdoorlab attack mmlm`` runs; then for each Z_near region and share (``near_region``,
``near_top``) and crafting objective, PGD crafts (a) a stratified set of the attacker's own
non-target training images and (b) non-target test images, at each budget, and the ASR of the
backdoored and of the clean model on both is printed (one JSON line per setting). Part (a) is what
an attacker can measure; part (b) says whether it predicts the test set. Nothing is chosen here.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_mmlm_choices.py \\
        --dataset mnist5k --target 1 --seed 2 --clean-model CLEAN.safetensors --cache-dir CACHE \\
        [--objectives latent,latent+margin] [--regions expansion,target] [--tops 0.05,0.1,0.25,0.5,1] [--eps 64,96,128]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from backdoorlab.attacks.base import AttackContext
from backdoorlab.attacks.mmlm import MMLM, MMLMParams, pair_codes
from backdoorlab.attacks.mmlm_codes import LatentCodes, near_codes
from backdoorlab.data.sources import load_dataset
from backdoorlab.data.subset import stratified_indices
from backdoorlab.train.evaluate import attack_success_rate, features
from backdoorlab.train.trainer import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--target", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--clean-model", required=True)
    ap.add_argument("--cache-dir", default=None, help="the OT cache of a grid (restored when the features match)")
    ap.add_argument("--objectives", default="latent")
    ap.add_argument("--regions", default="expansion,target")
    ap.add_argument("--tops", default="0.05,0.1,0.25,0.5,1.0")
    ap.add_argument("--eps", default="64,96,128", help="budgets in /255")
    ap.add_argument("--attacker-images", type=int, default=300)
    ap.add_argument("--test-images", type=int, default=900)
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args()
    if not Path(a.clean_model).is_file():
        ap.error(f"--clean-model: {a.clean_model} is not a file (this benchmark measures an existing clean model; it never trains one)")
    torch.set_num_threads(1)
    t, seed = a.target, a.seed
    ds = load_dataset(a.dataset)
    ctx = AttackContext(ds, "digit-cnn", TrainConfig(), seed=seed, progress=False, clean_model_path=Path(a.clean_model),
                        cache_dir=Path(a.cache_dir) if a.cache_dir else None)
    pl = MMLM(MMLMParams(target=t)).plant(ctx)  # the clean model is read from the file, never trained here
    clean, model, codes, tx, ty = pl.clean, pl.model, pl.codes, ds.train.x, ds.train.y.cpu()
    clean.requires_grad_(False)

    def pick(x, y, n):
        keep = torch.nonzero(y != t).flatten()
        keep = keep[stratified_indices(y[keep], n, seed)]
        return x[keep].cpu(), y[keep]

    sets = {"attacker": pick(tx, ty, a.attacker_images), "test": pick(ds.test.x, ds.test.y.cpu(), a.test_images)}
    print(json.dumps({"dataset": a.dataset, "target": t, "seed": seed, "ot_restored": pl.reused, "latent_codes": codes.stats}), flush=True)
    for obj in a.objectives.split(","):
        att = MMLM(MMLMParams(target=t, objective=obj))
        for region in a.regions.split(","):
            for top in (float(v) for v in a.tops.split(",")):
                c = LatentCodes(codes.z_far, codes.near_pool, codes.near_other, dict(codes.stats))
                zn, other = near_codes(model, clean, c, t, region, top)
                row = {"objective": obj, "near_region": region, "near_top": top, "z_near": len(zn)}
                for name, (x, y) in sets.items():
                    z = pair_codes(features(clean, x), y, zn, other)
                    for e in (int(v) for v in a.eps.split(",")):
                        xp = att.craft(clean.features, x, z, e / 255, a.steps, head=model.head, objective=obj)
                        row[f"{name}_asr_{e}"] = round(100 * attack_success_rate(model, xp, y, "all-to-one", t, ds.spec.num_classes), 1)
                        row[f"{name}_asr_clean_model_{e}"] = round(100 * attack_success_rate(clean, xp, y, "all-to-one", t, ds.spec.num_classes), 1)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
