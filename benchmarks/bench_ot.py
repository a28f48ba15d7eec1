"""Benchmark: the semi-discrete OT solver's step rate in its three modes, and its time to converge.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_ot.py [--n 5000 --d 512 --samples 20000 --steps 300]
        [--recompute-steps 20] [--threads T] [--device cpu|cuda]
        [--features-of runs/clean/model.safetensors --dataset mnist5k [--points 10000]]

Modes, all from the same seed and giving the same cells at every step (so the same h):
``candidates`` (the default: each step reads each sample's 32 candidate cells, refreshed from S
when the potential has moved too far), ``cached`` (S = X·Yᵀ kept, a full argmax(S + h) per step)
and ``recompute`` (S recomputed every step: the low-memory baseline). Step rates include every
refresh; the one-off sample draw and cache build are reported apart. Targets are random
standardised Gaussians, or, with ``--features-of``, the penultimate features of a clean model's
training set (the MMLM setting), where the solver also runs to AE-OT's tolerance (2e-3) with
sample growth on, in the candidate and the cached mode. On a shared CPU, compare with
``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from backdoorlab.ot import OTConfig, SemiDiscreteOT


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MODES = {"candidates": dict(candidates=32), "cached": dict(candidates=0, cache=True), "recompute": dict(candidates=0, cache=False)}


def step_rates(y: torch.Tensor, samples: int, steps: int, recompute_steps: int, device: str, seed: int = 0) -> dict:
    dev = torch.device(device)
    out: dict = {"n": y.shape[0], "d": y.shape[1], "samples": samples, "device": str(dev), "threads": torch.get_num_threads()}
    hs = {}
    for mode, kw in MODES.items():
        n_steps = recompute_steps if mode == "recompute" else steps
        cfg = OTConfig(n_samples=samples, max_samples=samples, stall_steps=10**9, tol=1e-12, max_iter=n_steps, seed=seed, **kw)
        ot = SemiDiscreteOT(y, cfg, device=dev)
        t0 = time.perf_counter()
        ot.samples  # draws the Sobol samples (and builds the cache when cached)
        _sync(dev)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n_steps):
            ot.step()
        _sync(dev)
        elapsed = time.perf_counter() - t0
        out[mode] = {"steps": n_steps, "steps_per_s": n_steps / elapsed, "ms_per_step": 1e3 * elapsed / n_steps, "setup_s": setup,
                     "final_grad_norm": ot.last_grad_norm, "refreshes": ot._cand.refreshes if ot._cand is not None else None}
        hs[mode] = (n_steps, ot.h.cpu())
    out["speedup_candidates_vs_cached"] = out["candidates"]["steps_per_s"] / out["cached"]["steps_per_s"]
    out["speedup_candidates_vs_recompute"] = out["candidates"]["steps_per_s"] / out["recompute"]["steps_per_s"]
    # the same h after the same number of steps: rerun the candidate mode for the recompute count
    ref = SemiDiscreteOT(y, OTConfig(n_samples=samples, max_samples=samples, stall_steps=10**9, tol=1e-12, seed=seed), device=dev)
    ref.fit(max_iter=recompute_steps)
    out["identical_h"] = bool(torch.equal(hs["cached"][1], hs["candidates"][1]) and torch.equal(ref.h.cpu(), hs["recompute"][1]))
    return out


def to_convergence(y: torch.Tensor, device: str, seed: int = 0, max_iter: int = 6000) -> dict:
    """Steps, samples and seconds to ||g|| < 2e-3 (AE-OT's defaults otherwise), candidates vs cached."""
    out = {}
    for mode in ("candidates", "cached"):
        ot = SemiDiscreteOT(y, OTConfig(max_iter=max_iter, seed=seed, **MODES[mode]), device=torch.device(device))
        t0 = time.perf_counter()
        r = ot.fit()
        out[mode] = {"seconds": time.perf_counter() - t0, "steps": r.steps, "grad_norm": r.grad_norm, "converged": r.converged, "samples": r.n_samples}
    return out


def clean_features(model_path: str, dataset: str, points: int, seed: int = 0) -> torch.Tensor:
    from backdoorlab.artifacts import load_model
    from backdoorlab.data import load_dataset, stratified_indices
    from backdoorlab.train.evaluate import features

    data = load_dataset(dataset)
    f = features(load_model(model_path), data.train.x)
    if 0 < points < len(f):
        f = f[stratified_indices(data.train.y, points, seed)]
    return f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="number of random target points")
    p.add_argument("--d", type=int, default=512, help="feature dimension of the random targets")
    p.add_argument("--samples", type=int, default=20000, help="Monte Carlo sample count")
    p.add_argument("--steps", type=int, default=300, help="timed steps of the candidate and cached modes")
    p.add_argument("--recompute-steps", type=int, default=20, help="timed steps of the recompute mode")
    p.add_argument("--features-of", default=None, help="a clean model file: transport its training features instead")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--points", type=int, default=10000, help="stratified feature subset (MMLM's ot_points)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.features_of:
        y, what = clean_features(a.features_of, a.dataset, a.points, a.seed), f"{a.dataset} features of {a.features_of}"
    else:
        y, what = torch.randn(a.n, a.d, generator=torch.Generator().manual_seed(a.seed)), "random Gaussian targets"
    r = step_rates(y, a.samples, a.steps, a.recompute_steps, a.device, a.seed)
    print(f"semi-discrete OT: {what}, n={r['n']}, d={r['d']}, {a.samples} samples, device={r['device']}, "
          f"torch threads={r['threads']}, {platform.processor() or platform.machine()}")
    print(f"{'mode':<11} {'steps':>6} {'steps/s':>9} {'ms/step':>9} {'setup s':>8} {'refreshes':>9}")
    for key in MODES:
        m = r[key]
        print(f"{key:<11} {m['steps']:6d} {m['steps_per_s']:9.2f} {m['ms_per_step']:9.2f} {m['setup_s']:8.2f} {str(m['refreshes'] or '-'):>9}")
    print(f"speed-up of the candidate step: {r['speedup_candidates_vs_cached']:.1f}x over the cached full argmax, "
          f"{r['speedup_candidates_vs_recompute']:.1f}x over recomputing; identical h: {r['identical_h']}")
    if a.features_of:
        r["to_convergence"] = to_convergence(y, a.device, a.seed)
        for mode, c in r["to_convergence"].items():
            print(f"to ||g|| < 2e-3, {mode}: {c['steps']} steps, {c['samples']} samples, ||g|| {c['grad_norm']:.5f} "
                  f"({'converged' if c['converged'] else 'NOT converged'}) in {c['seconds']:.1f} s")
    print(json.dumps({"bench": "ot_step", **r}))


if __name__ == "__main__":
    main()
