"""Benchmark: semi-discrete OT steps/s with the cached S = X @ Y^T versus recomputing it every step.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_ot.py [--n 5000 --d 512 --samples 20000 --steps 20]
        [--threads T] [--device cpu|cuda]

Targets are random standardised Gaussian features. Both solvers run the same number of steps
from the same seed (sample growth disabled) and must end with bit-identical h. The one-off cache
build is reported separately and excluded from the cached per-step rate. On a shared CPU, many
small multi-threaded ops suffer from oversubscription: compare with ``--threads 1``.
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


def run(n: int, d: int, samples: int, steps: int, device: str, seed: int = 0) -> dict:
    dev = torch.device(device)
    y = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    out: dict = {"n": n, "d": d, "samples": samples, "steps": steps, "device": str(dev),
                 "threads": torch.get_num_threads()}
    hs = {}
    for cache in (True, False):
        cfg = OTConfig(n_samples=samples, max_samples=samples, stall_steps=10**9, tol=1e-12,
                       max_iter=steps, cache=cache, seed=seed)
        ot = SemiDiscreteOT(y, cfg, device=dev)
        t0 = time.perf_counter()
        ot.samples  # draws the Sobol samples (and builds the cache when cache=True)
        _sync(dev)
        setup = time.perf_counter() - t0
        ot.step()  # warm-up step, not timed
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            ot.step()
        _sync(dev)
        elapsed = time.perf_counter() - t0
        key = "cached" if cache else "recompute"
        out[key] = {"steps_per_s": steps / elapsed, "ms_per_step": 1e3 * elapsed / steps,
                    "setup_s": setup, "cache_build_s": ot.cache_build_time, "final_grad_norm": ot.last_grad_norm}
        hs[key] = ot.h.cpu()
    out["speedup"] = out["cached"]["steps_per_s"] / out["recompute"]["steps_per_s"]
    out["identical_h"] = bool(torch.equal(hs["cached"], hs["recompute"]))
    out["cache_mib"] = 4 * samples * n / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="number of target points")
    p.add_argument("--d", type=int, default=512, help="feature dimension")
    p.add_argument("--samples", type=int, default=20000, help="Monte Carlo sample count")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    r = run(a.n, a.d, a.samples, a.steps, a.device, a.seed)
    print(f"semi-discrete OT: n={a.n} targets, d={a.d}, {a.samples} samples, {a.steps} steps, "
          f"device={r['device']}, torch threads={r['threads']}, {platform.processor() or platform.machine()}")
    print(f"{'mode':<10} {'steps/s':>9} {'ms/step':>9} {'setup s':>9}")
    for key in ("cached", "recompute"):
        m = r[key]
        print(f"{key:<10} {m['steps_per_s']:9.2f} {m['ms_per_step']:9.1f} {m['setup_s']:9.2f}")
    print(f"cache build (one-off, excluded from steps/s): {r['cached']['cache_build_s']:.2f} s for "
          f"{r['cache_mib']:.0f} MiB; speed-up {r['speedup']:.1f}x; identical h: {r['identical_h']}")
    print(json.dumps({"bench": "ot_step", **r}))


if __name__ == "__main__":
    main()
