"""Issue 19's table: MMLM per dataset and target class over a grid's seeds (mean ± std), from the
cells of ``experiments/mmlm-targets.yaml``, with the goal checked per target: every seed reaches
90% ASR within the largest curve budget, with the clean model on the same images at least 50
points lower there. Also which crafting objective ``objective=auto`` chose, and how well the
attacker-side figures it chose from (its own training images) predicted the test curve.

    .venv/bin/python scripts/mmlm_targets.py runs/mmlm-targets [--gap 0.5]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics as st
from collections import Counter, defaultdict
from pathlib import Path


def ms(values: list[float], digits: int = 1) -> str:
    ok = [v for v in values if not math.isnan(v)]
    if not ok:
        return "none"
    out = f"{st.mean(ok):.{digits}f}" + (f" ± {st.stdev(ok):.{digits}f}" if len(ok) > 1 else "")
    return out + ("" if len(ok) == len(values) else f" ({len(values) - len(ok)} of {len(values)} none)")


def rows(run: Path, gap: float) -> dict[tuple[str, int], list[dict]]:
    out: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for f in sorted((run / "cells" / "attack").glob("*/*/mmlm-t=*/s*/metrics.json")):
        m = json.loads(f.read_text())
        curve = {round(p["epsilon"] * 255): p for p in m["asr_curve"]}
        top = max(curve)
        a90 = m.get("asr90_epsilon")
        at = curve[round(a90 * 255)] if a90 is not None else None
        test = {(round(p["epsilon"] * 255)): p["attack_success_rate"] for p in m["asr_curve"]}
        diffs = [abs(r["attacker_asr"] - test[round(r["epsilon"] * 255)]) for r in m.get("objective_selection", [])
                 if r["objective"] == m.get("objective_used") and round(r["epsilon"] * 255) in test]
        out[(f.parts[-5], int(f.parts[-3].split("=")[1]))].append({
            "ca": 100 * m["clean_accuracy"], "ca0": 100 * m["clean_accuracy_before"],
            "asr90": a90 * 255 if a90 is not None else math.nan,
            "asr_at": 100 * at["attack_success_rate"] if at else math.nan,
            "clean_at": 100 * at["attack_success_rate_clean_model"] if at else math.nan,
            "top": 100 * curve[top]["attack_success_rate"], "clean_top": 100 * curve[top]["attack_success_rate_clean_model"],
            "met": at is not None and at["attack_success_rate"] - at["attack_success_rate_clean_model"] >= gap,
            "objective": m.get("objective_used", "latent"), "diffs": diffs, "seconds": m.get("seconds", math.nan), "top_eps": top})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--gap", type=float, default=0.5, help="the clean model at least this far below at the 90%% budget")
    a = ap.parse_args()
    data = rows(a.run, a.gap)
    print("| dataset | target | seeds | ASR90 ε (/255) | ASR there (%) | clean model there (%) | ASR at the largest budget (%) | clean model there (%) | objective chosen | CA (%) (clean model) | goal met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    met_all, diffs, secs = [], [], []
    for (ds, t), r in sorted(data.items()):
        g = lambda k: [x[k] for x in r]  # noqa: E731
        met = sum(g("met"))
        met_all.append((ds, t, met, len(r)))
        diffs += [d for x in r for d in x["diffs"]]
        secs += g("seconds")
        chosen = ", ".join(f"{k} ×{v}" for k, v in sorted(Counter(g("objective")).items()))
        print(f"| {ds} | {t} | {len(r)} | {ms(g('asr90'))} | {ms(g('asr_at'))} | {ms(g('clean_at'))} | {ms(g('top'))} | {ms(g('clean_top'))} | {chosen} | "
              f"{ms(g('ca'))} ({ms(g('ca0'))}) | {met} of {len(r)} |")
    n_met = sum(1 for *_, met, n in met_all if met == n)
    print(f"\nTargets meeting the goal on every seed: {n_met} of {len(met_all)}; runs meeting it: {sum(m for *_, m, _ in met_all)} of {sum(n for *_, n in met_all)}.")
    if diffs:
        print(f"Attacker-side ASR (its own training images) vs the test ASR at the same budget, chosen objective: mean |difference| "
              f"{100 * st.mean(diffs):.1f} points, largest {100 * max(diffs):.1f} ({len(diffs)} budget points).")
    ok = [s for s in secs if not math.isnan(s)]
    if ok:
        print(f"MMLM run: {st.mean(ok):.0f} s mean, {min(ok):.0f}-{max(ok):.0f} s ({len(ok)} runs).")


if __name__ == "__main__":
    main()
