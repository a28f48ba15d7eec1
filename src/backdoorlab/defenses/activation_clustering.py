"""Activation Clustering (Chen et al. 2018, "Detecting Backdoor Attacks on Deep Neural Networks by
Activation Clustering"): per class, cluster the penultimate activations in two and look for a
small, well-separated cluster.

Per class (by the label the defender has: as delivered in the training set; for an attack that
leaves the training set clean, the model's prediction on the presented test inputs, see
:mod:`backdoorlab.defenses.view`): activations ``model.features``
-> ``dims`` = 10 dimensions (PCA by default, FastICA with ``reduction=ica``) -> k-means with k = 2.
The smaller cluster is the poison candidate. The paper's readings are all reported per class:
the smaller cluster's relative size (suspicious below ``size_threshold`` = 0.35) and the silhouette
score of the 2-clustering in the reduced space (suspicious above ``silhouette_threshold`` = 0.1).
``flag_rule`` (our choice, default ``size``, the paper's relative-size rule) says which one flags a
class and removes its smaller cluster; ``flagged_by_size`` and ``flagged_by_silhouette`` list both.
Caveats seen on MNIST-5k: clean digit classes are often bimodal (silhouette 0.17-0.41), so the
silhouette rule flags every class; and with 10% of the whole training set relabelled to one class
the poison is about half of that class, so the size rule does not flag it although the two
clusters are exactly clean and poison. That is why ``ari`` is the score that ranks attacks.
The ground truth scores the decision: ``ari`` is the adjusted Rand index between the two clusters
and the true clean/poison split of the target class (the MMLM paper's Table 7; mean over poisoned
classes for all-to-all). The plot is a 2-D t-SNE of the target class's clean and poisoned latents
(MMLM Figure 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score, silhouette_score
from threadpoolctl import threadpool_limits

from ..errors import ConfigError
from ..plots import scatter
from ..validate import check_fraction
from .base import DEFENSES, Defense, DefenseKind, DefenseParams, check_int
from .view import DefenderView, GroundTruth, limit
from ..train.evaluate import features


@dataclass
class ActivationClusteringParams(DefenseParams):
    dims: int = 10
    reduction: Literal["pca", "ica"] = "pca"
    flag_rule: Literal["size", "silhouette", "both", "either"] = "size"  # (choice)
    size_threshold: float = 0.35
    silhouette_threshold: float = 0.1
    n_init: int = 10  # k-means restarts (choice)
    tsne_points: int = 1000  # at most this many target-class points in the t-SNE plot (choice); 0 = no plot

    def validate(self) -> None:
        check_int("dims", self.dims)
        check_int("n_init", self.n_init)
        check_int("tsne_points", self.tsne_points, 0)
        check_fraction("size_threshold", self.size_threshold)
        if not -1.0 <= self.silhouette_threshold <= 1.0:
            raise ConfigError("silhouette_threshold", f"must lie in [-1, 1], got {self.silhouette_threshold}")


@DEFENSES.register("activation-clustering")
class ActivationClustering(Defense):
    name = "activation-clustering"
    paper = "Chen et al., Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering (2018)"
    kind = DefenseKind.DATA
    Params = ActivationClusteringParams
    headline = ("ari", "silhouette", "relative_size", "flagged_by_size", "flagged_by_silhouette")
    p: ActivationClusteringParams

    def _reduce(self, z: np.ndarray, seed: int) -> np.ndarray:
        k = min(self.p.dims, z.shape[0] - 1, z.shape[1])
        if self.p.reduction == "ica":
            return FastICA(n_components=k, random_state=seed, max_iter=1000, whiten="unit-variance").fit_transform(z)
        return PCA(n_components=k, random_state=seed).fit_transform(z)

    def _flag(self, size: float, sil: float) -> bool:
        small, separated = size < self.p.size_threshold, sil > self.p.silhouette_threshold
        return {"size": small, "silhouette": separated, "both": small and separated, "either": small or separated}[self.p.flag_rule]

    def decide(self, view: DefenderView) -> dict[str, Any]:
        data = view.inspected
        z = features(view.model, data.x).numpy().astype(np.float64)
        y = data.y.cpu().numpy()
        suspect = np.zeros(len(y), dtype=bool)
        cluster = np.full(len(y), -1, dtype=np.int64)  # 0/1 within each class, -1: class too small
        per_class: list[dict[str, Any]] = []
        for c in range(view.num_classes):
            members = np.nonzero(y == c)[0]
            if len(members) < 4:
                per_class.append({"class": c, "size": int(len(members)), "relative_size": None, "silhouette": None, "flagged": False})
                continue
            with threadpool_limits(1):  # many tiny problems: OpenMP threads only spin (40x slower on a busy CPU)
                red = self._reduce(z[members], view.seed)
                lab = KMeans(2, n_init=self.p.n_init, random_state=view.seed).fit_predict(red)
                counts = np.bincount(lab, minlength=2)
                sil = float(silhouette_score(red, lab)) if counts.min() > 0 else 0.0
            small = int(counts.argmin())
            rel = float(counts.min() / counts.sum())
            flagged = self._flag(rel, sil)
            if flagged:
                suspect[members[lab == small]] = True
            cluster[members] = lab
            per_class.append({"class": c, "size": int(len(members)), "relative_size": rel, "silhouette": sil, "flagged": bool(flagged),
                              "small_by_size": rel < self.p.size_threshold, "separated_by_silhouette": sil > self.p.silhouette_threshold})
        return {
            "flag_rule": self.p.flag_rule,
            "flagged_classes": [r["class"] for r in per_class if r["flagged"]],
            "flagged_by_size": [r["class"] for r in per_class if r.get("small_by_size")],
            "flagged_by_silhouette": [r["class"] for r in per_class if r.get("separated_by_silhouette")],
            "per_class": per_class,
            "suspect": torch.from_numpy(suspect),
            "cluster": torch.from_numpy(cluster),
            "_features": z,
        }

    def score(self, view: DefenderView, decision: dict[str, Any], truth: GroundTruth) -> dict[str, Any]:
        y, flag = view.inspected.y.cpu().numpy(), truth.inspected_poisoned.numpy()
        cluster, suspect = decision["cluster"].numpy(), decision["suspect"].numpy()
        per_class = []
        for row in decision["per_class"]:
            members = np.nonzero(y == row["class"])[0]
            t = flag[members]
            ari = float(adjusted_rand_score(t, cluster[members])) if row["relative_size"] is not None and t.any() else None
            per_class.append({**row, "ari": ari, "poisoned": int(t.sum())})
        tgt = per_class[truth.target]
        poisoned_aris = [r["ari"] for r in per_class if r["ari"] is not None]
        ari = tgt["ari"] if truth.target_mode == "all-to-one" else (float(np.mean(poisoned_aris)) if poisoned_aris else None)
        hit = int((suspect & flag).sum())
        metrics: dict[str, Any] = {
            "target_flagged": bool(tgt["flagged"]),
            "ari": ari,
            "silhouette": tgt["silhouette"],
            "relative_size": tgt["relative_size"],
            "recall": hit / max(1, int(flag.sum())),
            "precision": hit / int(suspect.sum()) if suspect.any() else float("nan"),
            "per_class": per_class,
        }
        path = view.plot_path("activation_clustering_tsne.png")
        if path is not None and self.p.tsne_points > 0:
            members = np.nonzero(y == truth.target)[0]
            members = members[limit(len(members), self.p.tsne_points, view.seed).numpy()]
            if len(members) > 5:
                with threadpool_limits(1):
                    emb = TSNE(2, perplexity=float(min(30, len(members) - 1)), init="pca", random_state=view.seed).fit_transform(decision["_features"][members])
                is_p = torch.from_numpy(flag[members])
                pts = torch.from_numpy(emb).float()
                scatter({"clean": pts[~is_p], "poisoned": pts[is_p]}, path, title=f"class {truth.target} latents (t-SNE), ARI {ari if ari is None else round(ari, 3)}")
                metrics["plot"] = path.name
        return metrics
