"""Where the CPU time of a grid goes, and what the session-7 speed changes buy (issue 17).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_speed.py --out benchmarks/out/speed [--fashion]

Measured in one process, alternating the variants so that all see the same machine load:

1. Training images/s of the Digit-CNN on MNIST-5k (one epoch of 4,000 images after a warm-up
   batch, batch 128, the default recipe's augmentation), four ways: fp32 with the input and
   weights in the usual layout; fp32 channels-last; bf16 autocast; bf16 autocast + channels-last
   (what ``amp=auto`` picks on an AVX-512 / AMX CPU since session 7).
2. Inference images/s (3,200 images, one batch) in fp32, usual layout vs channels-last (what
   :meth:`Classifier.forward_to` does on the CPU), with the largest difference of the logits.
3. MMLM's crafting step: PGD towards latent codes (1,000 images, 20 steps, ε = 128/255) with the
   usual layout vs channels-last, and with an early stop, the samples that stopped still stepping
   (before) vs dropped from the batch (after); the images must be identical.
4. Two 1-thread training processes side by side vs one 2-thread process (the processes executor).
5. With ``--fashion``: clean accuracy of the default recipe in fp32 vs bf16 + channels-last,
   MNIST-5k seeds 0-2 and Fashion-MNIST seed 0.

Writes results.json and results.md in --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from backdoorlab.data import load_dataset
from backdoorlab.models import Arch, build_model
from backdoorlab.optim import PGDConfig, pgd
from backdoorlab.recipes import default_train_config
from backdoorlab.train import accuracy, train

VARIANTS = {"fp32": ("off", "off", False), "fp32 channels-last": ("off", "on", True), "bf16": ("on", "off", False), "bf16 + channels-last (default)": ("on", "on", True)}


def _model(spec, layout: bool):
    torch.manual_seed(0)
    m = build_model(Arch("digit-cnn", spec.shape[0], spec.num_classes, spec.shape[1:]))
    m.channels_last = layout
    return m


def train_rate(data, variant: str, images: int = 4000) -> float:
    amp, cl, layout = VARIANTS[variant]
    m = _model(data.spec, layout)
    cfg = replace(default_train_config("mnist5k", "digit-cnn"), epochs=1, amp=amp, channels_last=cl, schedule="none")
    train(m, data.train.subset(torch.arange(128)), data.spec, cfg, progress=False)
    return train(m, data.train.subset(torch.arange(images)), data.spec, cfg, progress=False).images_per_second


@torch.no_grad()
def infer(m, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    m(x[:64])
    t0 = time.perf_counter()
    y = m(x)
    return len(x) / (time.perf_counter() - t0), y


def craft(m, x, z, early: bool, compact: bool) -> tuple[float, torch.Tensor]:
    """PGD towards ``z``; ``compact=False`` reproduces the pre-session-7 loop (stopped samples still step)."""
    loss = lambda xa, i: (m.features(xa) - z[i]).norm(dim=1)  # noqa: E731
    stop = (lambda xa, i: m(xa).argmax(1) == 0) if early else None  # noqa: E731
    cfg = PGDConfig(epsilon=128 / 255, steps=20, early_stop=stop)
    t0 = time.perf_counter()
    out = pgd(x, loss, cfg) if compact or stop is None else _pgd_without_compaction(x, loss, cfg)
    return time.perf_counter() - t0, out


def _pgd_without_compaction(x, loss_fn, cfg) -> torch.Tensor:
    """The session-6 loop: every sample goes through the model at every step, stopped ones with a zero step."""
    from backdoorlab.optim import signed_step_

    idx = torch.arange(len(x))
    delta = torch.zeros_like(x).requires_grad_(True)
    best, best_loss = x.clone(), torch.full((len(x),), float("inf"))
    active = torch.ones(len(x), dtype=torch.bool)
    for _ in range(cfg.steps):
        loss = loss_fn(x + delta, idx)
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        with torch.no_grad():
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best[better] = (x + delta)[better]
            active &= ~cfg.early_stop(x + delta, idx)
            if not bool(active.any()):
                break
            signed_step_(delta, grad, cfg.alpha * active.view(-1, 1, 1, 1), cfg.epsilon)
            delta.copy_((x + delta).clamp(0, 1) - x)
    with torch.no_grad():
        final = x + delta
        better = loss_fn(final, idx) < best_loss
        best[better] = final[better]
        best[~active] = final[~active]
    return best


def _worker(threads: int, q) -> None:
    torch.set_num_threads(threads)
    q.put(train_rate(load_dataset("mnist5k"), "bf16 + channels-last (default)"))


def side_by_side() -> dict:
    ctx = multiprocessing.get_context("spawn")
    res = {}
    for label, procs, threads in (("one process, 2 threads", 1, 2), ("two processes, 1 thread each", 2, 1)):
        q = ctx.Queue()
        ps = [ctx.Process(target=_worker, args=(threads, q)) for _ in range(procs)]
        for p in ps:
            p.start()
        rates = [q.get() for _ in ps]
        for p in ps:
            p.join()
        res[label] = sum(rates)
    return res


def accuracies(datasets: list[tuple[str, int]]) -> list[dict]:
    rows = []
    for name, seed in datasets:
        d = load_dataset(name)
        for variant in ("fp32", "bf16 + channels-last (default)"):
            amp, cl, layout = VARIANTS[variant]
            torch.manual_seed(seed)
            m = build_model(Arch("digit-cnn", d.spec.shape[0], d.spec.num_classes, d.spec.shape[1:]))
            m.channels_last = layout
            cfg = replace(default_train_config(name, "digit-cnn"), amp=amp, channels_last=cl)
            h = train(m, d.train, d.spec, cfg, seed=seed, progress=False)
            rows.append({"dataset": name, "seed": seed, "variant": variant, "clean_accuracy": accuracy(m, d.test), "train_seconds": h.seconds})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out/speed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fashion", action="store_true", help="also the clean-accuracy comparison (about 6 minutes)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}"}
    data = load_dataset("mnist5k")
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(a.rounds):
        for v in VARIANTS:
            rates[v].append(train_rate(data, v))
    res["training"] = {v: statistics.median(r) for v, r in rates.items()}
    print(res["training"], flush=True)
    x = data.test.x[:1000].float().div(255)
    xs = torch.cat([x] * 4)[:3200]
    m_plain, m_cl = _model(data.spec, False).eval(), _model(data.spec, True).eval()
    inf = {"usual layout": [], "channels-last": []}
    for _ in range(a.rounds):
        r0, y0 = infer(m_plain, xs)
        r1, y1 = infer(m_cl, xs)
        inf["usual layout"].append(r0)
        inf["channels-last"].append(r1)
    res["inference"] = {k: statistics.median(v) for k, v in inf.items()} | {"max_logit_difference": float((y0 - y1).abs().max())}
    print(res["inference"], flush=True)
    for m in (m_plain, m_cl):
        m.requires_grad_(False)
    z = torch.randn(len(x), m_plain.feature_dim, generator=torch.Generator().manual_seed(0)) * 3
    t_plain, a_plain = craft(m_plain, x, z, False, True)
    t_cl, a_cl = craft(m_cl, x, z, False, True)
    t_old, e_old = craft(m_cl, x, z, True, False)
    t_new, e_new = craft(m_cl, x, z, True, True)
    res["pgd"] = {"usual layout s": t_plain, "channels-last s": t_cl, "max image difference (layouts)": float((a_plain - a_cl).abs().max()),
                  "early stop, all samples step s": t_old, "early stop, stopped samples dropped s": t_new, "max image difference (early stop)": float((e_old - e_new).abs().max())}
    print(res["pgd"], flush=True)
    res["side_by_side"] = side_by_side()
    print(res["side_by_side"], flush=True)
    if a.fashion:
        res["accuracy"] = accuracies([("mnist5k", 0), ("mnist5k", 1), ("mnist5k", 2), ("fashion-mnist", 0)])
    (out / "results.json").write_text(json.dumps(res, indent=2))
    lines = [f"Machine: {res['machine']}", "", "| training, Digit-CNN, MNIST-5k | images/s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in res["training"].items()]
    lines += ["", "| inference, fp32 | images/s |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in res["inference"].items() if k != "max_logit_difference"]
    lines += [f"\nLargest logit difference between the layouts: {res['inference']['max_logit_difference']:.2e}", "", "| PGD, 1,000 images, 20 steps | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3g} |" for k, v in res["pgd"].items()]
    lines += ["", "| training side by side | total images/s |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in res["side_by_side"].items()]
    if a.fashion:
        lines += ["", "| dataset | seed | variant | clean accuracy | train s |", "|---|---|---|---|---|"]
        lines += [f"| {r['dataset']} | {r['seed']} | {r['variant']} | {r['clean_accuracy']:.4f} | {r['train_seconds']:.1f} |" for r in res["accuracy"]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
