"""The ASR-versus-ε curves of every finished MMLM cell of a grid, as a markdown table (mean ± std
over seeds, backdoored model and the clean model on the same crafted images), with how far PGD got
towards the Z_near codes (the median share of each image's latent distance to its code that is left).

    .venv/bin/python scripts/mmlm_curve.py runs/mmlm [--attack-label mmlm]

The results table keeps scalars only; the curve lives in each cell's ``metrics.json``
(``asr_curve``), which is what this reads.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from backdoorlab.experiments.table import format_mean_std


def curves(run: Path, label: str) -> dict[tuple[str, str, float], dict[str, list[float]]]:
    """(dataset, model, ε) -> {"backdoored": [...], "clean": [...], "steps": [...]} over seeds."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for metrics in sorted((run / "cells" / "attack").glob(f"*/*/{label}/s*/metrics.json")):
        dataset, model = metrics.parts[-5], metrics.parts[-4]
        for point in json.loads(metrics.read_text()).get("asr_curve", []):
            key = (dataset, model, round(float(point["epsilon"]), 6))
            out[key]["backdoored"].append(point["attack_success_rate"])
            out[key]["clean"].append(point["attack_success_rate_clean_model"])
            out[key]["steps"].append(point["steps"])
            if "latent_distance_left" in point:  # since session 6
                out[key]["left"].append(point["latent_distance_left"])
    return out


def markdown(data: dict) -> str:
    lines = ["| dataset | model | ε (/255) | PGD steps | ASR, backdoored (%) | ASR, clean model (%) | latent distance left (median, %) | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for (ds, model, eps), v in sorted(data.items()):
        steps = "/".join(str(s) for s in sorted(set(v["steps"])))
        lines.append(f"| {ds} | {model} | {eps * 255:.0f} | {steps} | {format_mean_std(v['backdoored'], '.2f', 100)} | "
                     f"{format_mean_std(v['clean'], '.2f', 100)} | {format_mean_std(v['left'], '.1f', 100)} | {len(v['backdoored'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--attack-label", default="mmlm", help="the MMLM cells' folder name under cells/attack/<dataset>/<model>/")
    a = ap.parse_args()
    data = curves(a.run, a.attack_label)
    if not data:
        raise SystemExit(f"error: no finished MMLM cell with an asr_curve under {a.run}/cells/attack/*/*/{a.attack_label}/")
    print(markdown(data))


if __name__ == "__main__":
    main()
