"""Benchmark: does Cognitive Distillation's premise hold for a backdoored model?

    PYTHONPATH=src .venv/bin/python benchmarks/bench_cd_premise.py --out /tmp/cd-premise \
        --runs RUN [RUN ...] [--inputs 300] [--loss-inputs 100] [--fills 20] [--threads T]

Cognitive Distillation (Huang et al., ICLR 2023) flags an input when the smallest mask that keeps
the model's logits is small. That works when a backdoored input's logits depend on the trigger
alone. For each finished attack run with a ``mask-pattern`` trigger (BadNets, Blended) this script
measures, with the defense's default parameters:

- the AUROC of the mask L1 norm (small = poisoned) in both protocols of the paper's code: clean vs
  poisoned *test* inputs (the defense's own protocol) and clean vs poisoned samples of the
  *training set as delivered* (the paper's headline protocol);
- the objective's terms (mean |Δlogit|, γ·||m||₁, β·TV) of reference masks on clean and poisoned
  test inputs, averaged over ``--fills`` random fills: the mask the optimisation found, the full
  mask, the trigger's own region only, and the empty mask. When the premise holds, the
  trigger-only mask costs a poisoned input less than the mask found; when it costs more, the
  objective itself prefers masks that keep the image, and no optimiser can make them small.

Writes OUT/cd_premise.md and OUT/cd_premise.json. Seed 0 throughout.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import Tensor

from backdoorlab.data.core import to_float
from backdoorlab.defenses.base import frozen
from backdoorlab.defenses.view import load_case, limit
from backdoorlab.defenses.cognitive_distillation import CognitiveDistillationParams, distill_masks, objective_terms
from backdoorlab.metrics.ranking import auroc


@torch.no_grad()
def mean_terms(model, x: Tensor, m: Tensor, p: CognitiveDistillationParams, fills: int, g: torch.Generator) -> dict[str, float]:
    """Mean over inputs of the CD objective's three terms for masks ``m``, over ``fills`` random fills."""
    ref = model(x).float()
    dev = torch.zeros(len(x))
    for _ in range(fills):
        u = torch.rand(x.shape[0], x.shape[1], 1, 1, generator=g)
        logit, l1, tv = objective_terms(model(x * m + (1 - m) * u).float(), ref, m, p)
        dev += logit
    t = {"logit": dev / fills, "l1": l1, "tv": tv}
    t["total"] = t["logit"] + t["l1"] + t["tv"]
    return {k: float(v.mean()) for k, v in t.items()}


def study(run: Path, n: int, n_loss: int, fills: int) -> dict:
    # a study of the method's premise: it reads the ground truth (which inputs are poisoned, the
    # trigger) to build its groups, as no defense may
    view, truth = load_case(run)
    trig = truth.trigger
    if trig is None or not hasattr(trig, "mask") or view.inspected_source != "training-set":
        raise SystemExit(f"{run}: needs a poisoning run with a mask-pattern trigger (BadNets, Blended)")
    p = CognitiveDistillationParams()
    g = torch.Generator().manual_seed(0)
    ev, px = truth.evaluation, truth.poisoned
    groups = {"test clean": ev.x[limit(len(ev), n, 0)], "test poisoned": px[limit(len(px), n, 1)]}
    delivered, flag = view.inspected, truth.inspected_poisoned
    for name, f in (("train clean", ~flag), ("train poisoned", flag)):
        idx = torch.nonzero(f).flatten()
        groups[name] = delivered.x[idx[limit(len(idx), n, 2)]]
    t0 = time.perf_counter()
    masks = {k: distill_masks(view.model, x, p, g, view.device) for k, x in groups.items()}
    l1 = {k: m.flatten(1).sum(1) for k, m in masks.items()}
    out = {
        "run": str(run), "attack": json.loads((run / "config.json").read_text())["attack"], "dataset": view.spec.name,
        "model": view.model.arch.name, "width": view.model.arch.width, "inputs_per_group": n,
        "auroc_test": auroc(-l1["test clean"], -l1["test poisoned"]),
        "auroc_train": auroc(-l1["train clean"], -l1["train poisoned"]),
        "mean_l1": {k: float(v.mean()) for k, v in l1.items()},
        "l1": {k: v.tolist() for k, v in l1.items()},
        "mask_seconds": time.perf_counter() - t0,
        "terms": {},
    }
    tmask = (trig.mask.float().cpu().amax(0, keepdim=True) > 0).float()[None]  # (1, 1, H, W)
    with frozen(view.model):
        for name in ("test clean", "test poisoned"):
            x = to_float(groups[name][:n_loss])
            m = masks[name][:n_loss]
            refs = {"found": m, "full": torch.ones_like(m), "trigger region": tmask.expand_as(m).contiguous(), "empty": torch.zeros_like(m)}
            out["terms"][name] = {k: mean_terms(view.model, x, v, p, fills, g) for k, v in refs.items()}
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| run | model | AUROC test / train (small mask = poisoned) | mean ‖m‖₁ test clean / poisoned | train clean / poisoned |", "|---|---|---|---|---|"]
    for r in results:
        m = r["mean_l1"]
        lines.append(f"| {Path(r['run']).name} ({r['dataset']}) | {r['model']} x{r['width']:g} | {r['auroc_test']:.3f} / {r['auroc_train']:.3f} | "
                     f"{m['test clean']:.1f} / {m['test poisoned']:.1f} | {m['train clean']:.1f} / {m['train poisoned']:.1f} |")
    lines += ["", "Objective terms of reference masks (mean over inputs and fills): |Δlogit| + γ‖m‖₁ + β·TV = total", "",
              "| run | inputs | found | full | trigger region | empty |", "|---|---|---|---|---|---|"]
    for r in results:
        for grp, terms in r["terms"].items():
            cells = [f"{t['logit']:.2f} + {t['l1']:.2f} + {t['tv']:.3f} = **{t['total']:.2f}**" for t in terms.values()]
            lines.append(f"| {Path(r['run']).name} | {grp} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--inputs", type=int, default=300, help="inputs per group (test/train, clean/poisoned)")
    ap.add_argument("--loss-inputs", type=int, default=100)
    ap.add_argument("--fills", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for run in a.runs:
        r = study(Path(run), a.inputs, a.loss_inputs, a.fills)
        print(f"{run}: AUROC test {r['auroc_test']:.3f}, train {r['auroc_train']:.3f} ({r['mask_seconds']:.0f}s)", flush=True)
        results.append(r)
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__, "seed": 0}
    (out / "cd_premise.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "cd_premise.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
