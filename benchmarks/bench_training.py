"""Training throughput and accuracy benchmark (issue 2).

    .venv/bin/python benchmarks/bench_training.py --out benchmarks/out/training
    .venv/bin/python benchmarks/bench_training.py --out benchmarks/out/pipeline --only-pipeline

1. Images/s of every model with the in-memory batched pipeline (uint8 tensors, batched crop/flip),
   measured over a few training steps on MNIST-5k (1x28x28) and on CIFAR-shaped data (3x32x32).
2. The same model trained through a torch DataLoader with per-sample transforms (how most backdoor
   toolkits feed data), in two variants: cheap tensor ops per sample, and the torchvision-style
   path (uint8 -> PIL image, trigger stamped on poisoned indices, pad-and-crop in PIL, to a
   normalised tensor); alternated with the batched pipeline in the same process so that all see
   the same machine load (num_workers=0: the machine has 2 cores, both used by the model).
3. Clean accuracy reached by the Digit CNN on MNIST-5k and on Fashion-MNIST with the default recipe.
Writes results.json and results.md in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backdoorlab.data import ImageSet, load_dataset
from backdoorlab.data.core import DatasetSpec
from backdoorlab.models import Arch, build_model
from backdoorlab.recipes import default_train_config
from backdoorlab.train import TrainConfig, accuracy, train


def throughput(name: str, spec: DatasetSpec, data: ImageSet, images: int, batch: int, amp: str) -> float:
    torch.manual_seed(0)
    model = build_model(Arch(name, spec.shape[0], spec.num_classes, spec.shape[1:]))
    sub = data.subset(torch.arange(min(len(data), batch)))  # one warm-up epoch of one batch
    cfg = TrainConfig(epochs=1, batch_size=batch, amp=amp, schedule="none")
    train(model, sub, spec, cfg, progress=False)
    sub = data.subset(torch.arange(min(len(data), images)))
    hist = train(model, sub, spec, cfg, progress=False)
    return hist.images_per_second


class PerSampleDataset(torch.utils.data.Dataset):
    """The usual pipeline: numpy images, a Python transform per sample (crop with padding, to float)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, pad: int) -> None:
        self.x, self.y, self.pad = x, y, pad

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = torch.from_numpy(self.x[i]).float() / 255.0
        p = self.pad
        img = F.pad(img, (p, p, p, p))
        r, c = np.random.randint(0, 2 * p + 1, size=2)
        h, w = self.x.shape[2:]
        return img[:, r : r + h, c : c + w], int(self.y[i])


class PilPerSampleDataset(PerSampleDataset):
    """What backdoor toolkits built on torchvision do per sample: uint8 array -> PIL image, stamp the
    trigger on poisoned indices, pad-and-crop in PIL, back to a normalised float tensor."""

    def __init__(self, x: np.ndarray, y: np.ndarray, pad: int, poisoned: set[int]) -> None:
        super().__init__(x, y, pad)
        self.poisoned = poisoned

    def __getitem__(self, i: int):
        from PIL import Image, ImageOps

        arr = self.x[i][0]
        if i in self.poisoned:
            arr = arr.copy()
            arr[-4:-1, -4:-1] = 255
        img = ImageOps.expand(Image.fromarray(arr), border=self.pad, fill=0)
        r, c = np.random.randint(0, 2 * self.pad + 1, size=2)
        h, w = arr.shape
        img = img.crop((c, r, c + w, r + h))
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        return (t - 0.1307) / 0.3081, int(self.y[i])  # the usual Normalize


def dataloader_epoch(model: torch.nn.Module, loader, opt) -> float:
    model.train()
    n, t0 = 0, time.perf_counter()
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(yb)
    return n / (time.perf_counter() - t0)


def pipeline_comparison(data, spec: DatasetSpec, name: str, rounds: int, batch: int) -> dict:
    arch = Arch(name, spec.shape[0], spec.num_classes, spec.shape[1:])
    torch.manual_seed(0)
    m1, m2 = build_model(arch), build_model(arch)
    m3 = build_model(arch)
    x, y = data.x.numpy(), data.y.numpy()
    loader = torch.utils.data.DataLoader(PerSampleDataset(x, y, spec.crop_pad), batch_size=batch, shuffle=True, num_workers=0)
    pil = torch.utils.data.DataLoader(PilPerSampleDataset(x, y, spec.crop_pad, set(range(0, len(y), 10))), batch_size=batch, shuffle=True, num_workers=0)
    opt = torch.optim.SGD(m2.parameters(), lr=0.01, momentum=0.9)
    opt3 = torch.optim.SGD(m3.parameters(), lr=0.01, momentum=0.9)
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.01, schedule="none", amp="off")
    ours, theirs, pils = [], [], []
    for _ in range(rounds):  # alternate so all see the same load
        ours.append(train(m1, data, spec, cfg, progress=False).images_per_second)
        theirs.append(dataloader_epoch(m2, loader, opt))
        pils.append(dataloader_epoch(m3, pil, opt3))
    o, t, p = (float(np.median(v)) for v in (ours, theirs, pils))
    return {"model": name, "batched_images_per_s": o, "dataloader_images_per_s": t, "speedup": o / t,
            "pil_dataloader_images_per_s": p, "speedup_vs_pil": o / p}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out/training")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-fashion", action="store_true")
    ap.add_argument("--only-pipeline", action="store_true", help="run only the pipeline comparison")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}", "threads": torch.get_num_threads()}
    mnist = load_dataset("mnist5k")
    g = torch.Generator().manual_seed(0)
    cifar_like = ImageSet(torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (512,), generator=g))
    cifar_spec = DatasetSpec("cifar-shaped", (3, 32, 32), 10, tuple("0123456789"), hflip=True, crop_pad=4)
    rows = []
    for name in () if a.only_pipeline else ("digit-cnn", "traffic-cnn", "resnet18", "preact-resnet18", "vgg16-bn"):
        small = name in ("digit-cnn", "traffic-cnn")
        for label, spec, data in (("mnist5k 1x28x28", mnist.spec, mnist.train), ("3x32x32", cifar_spec, cifar_like)):
            imgs = 4000 if small else 256
            row = {"model": name, "data": label, "fp32": throughput(name, spec, data, imgs, 128 if small else 64, "off")}
            if not small:
                row["bf16_autocast_channels_last"] = throughput(name, spec, data, imgs, 64, "on")
            rows.append(row)
            print(row, flush=True)
    res["throughput"] = rows
    res["pipeline"] = [pipeline_comparison(mnist.train, mnist.spec, "digit-cnn", a.rounds, 128)]
    print(res["pipeline"], flush=True)
    acc = []
    for ds in [] if a.only_pipeline else ["mnist5k"] + ([] if a.skip_fashion else ["fashion-mnist"]):
        d = load_dataset(ds)
        cfg = default_train_config(ds, "digit-cnn")
        torch.manual_seed(0)
        m = build_model("digit-cnn", d.spec)
        h = train(m, d.train, d.spec, cfg, seed=0, progress=False)
        acc.append({"dataset": ds, "model": "digit-cnn", "epochs": cfg.epochs, "clean_accuracy": accuracy(m, d.test), "train_seconds": h.seconds, "seed": 0})
        print(acc[-1], flush=True)
    res["accuracy"] = acc
    (out / "results.json").write_text(json.dumps(res, indent=2))
    lines = [f"Machine: {res['machine']}", "", "| model | data | fp32 img/s | bf16+channels_last img/s |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['data']} | {r['fp32']:.0f} | {r.get('bf16_autocast_channels_last', float('nan')):.0f} |" for r in rows]
    lines += ["", "| model | batched in-memory img/s | DataLoader, tensor per-sample img/s | speed-up | DataLoader, PIL per-sample + trigger img/s | speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['model']} | {p['batched_images_per_s']:.0f} | {p['dataloader_images_per_s']:.0f} | {p['speedup']:.2f}x | {p['pil_dataloader_images_per_s']:.0f} | {p['speedup_vs_pil']:.2f}x |" for p in res["pipeline"]]
    lines += ["", "| dataset | model | epochs | clean accuracy | train s |", "|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['model']} | {r['epochs']} | {r['clean_accuracy']:.4f} | {r['train_seconds']:.1f} |" for r in acc]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
