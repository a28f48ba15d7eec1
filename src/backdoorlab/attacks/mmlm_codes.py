"""MMLM's latent side: the semi-discrete OT over penultimate features, Z_far / Z_near, the poisoned
feature set, and the fine-tuning of the head alone (Backdoor Attack with Mode Mixture Latent
Modification, Sections 4.2 "Mode Mixture Latent Modification").
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..artifacts import write_safetensors
from ..data.core import DatasetSpec, ImageSet
from ..errors import BackdoorLabError
from ..models.base import Classifier
from ..ot import OTConfig, OTResult, SemiDiscreteOT, class_distances, mode_mixture
from ..train.trainer import TrainConfig, train


@dataclass
class LatentCodes:
    z_far: Tensor  # (n_far, d) codes implanted as target-class features
    near_pool: Tensor  # (m, d) candidate Z_near codes (filtered by the fine-tuned head later)
    near_other: Tensor  # (m,) the non-target class each candidate mixes with
    stats: dict


def fit_ot(feats: Tensor, p, seed: int, device: torch.device, progress: bool, cache: Path | None = None) -> tuple[SemiDiscreteOT, OTResult, bool]:
    """The semi-discrete OT onto ``feats``; with ``cache``, a fit of the same features, settings and
    seed made by an earlier run (every MMLM cell on one clean model shares it) is restored instead
    of refitted: the same potential, Adam state and sample set, hence the same cells. Returns the
    solver, the fit's result and whether it was restored."""
    cfg = OTConfig(source=p.ot_source, n_samples=p.ot_samples, max_iter=p.ot_max_iter, tol=p.ot_tol, seed=seed)
    ot = SemiDiscreteOT(feats.to(device), cfg, device=device)
    path = None
    if cache is not None:
        key = hashlib.sha256(feats.detach().cpu().float().contiguous().numpy().tobytes() + repr(cfg).encode()).hexdigest()[:24]
        path = cache / f"ot-{key}.safetensors"
        if path.exists():
            with safe_open(str(path), "pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                res = json.loads((f.metadata() or {})["result"])
            ot.load_state_dict(state)
            return ot, OTResult(**res), True
    res = ot.fit(progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v if torch.is_tensor(v) else torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else torch.long) for k, v in ot.state_dict().items()}
        write_safetensors(path, state, {"result": json.dumps(asdict(res))})
    return ot, res, False


def select_codes(ot: SemiDiscreteOT, feats: Tensor, labels: Tensor, p, n_far: int, seed: int) -> LatentCodes:
    """Generate codes with the extended OT map and keep the mode-mixture ones that mix the target.

    Z_far: angle threshold θ_far_target for codes whose first cell is of the target class and
    θ_far_other for the others; mixing the target with another class; closer to that other class
    than to the target (distance ratio d_target / d_other > 1), the farthest from the target first.
    Z_near candidates: angle threshold θ_near, mixing the target, not as far from the target as
    Z_far (ratio ≤ ``near_ratio``), never a code implanted as Z_far; :func:`near_codes` keeps those
    inside the widened region. At most ``n_far`` Z_far codes are taken (all candidates when fewer).
    """
    mm = mode_mixture(ot, labels.to(ot.device), n_samples=p.generate, k=p.k, threshold=0.0, method=p.neighbour_method, seed=seed, angle_space=p.angle_space)
    t = p.target
    mixes_target = ((mm.cell_labels == t).any(1) & (mm.cell_labels != t).any(1)).cpu()
    min_angle, first = mm.min_angle.cpu(), mm.first_label.cpu()
    thr_far = torch.where(first == t, torch.tensor(p.theta_far_target), torch.tensor(p.theta_far_other))
    d_t, d_o = class_distances(mm.codes, feats.to(mm.codes.device), labels.to(mm.codes.device), t)
    ratio = (d_t / d_o.clamp_min(1e-12)).cpu()
    far_ok = mixes_target & (min_angle > thr_far) & (ratio > 1.0)
    near_ok = mixes_target & (min_angle > p.theta_near) & (ratio <= p.near_ratio)
    codes = mm.codes.cpu()
    far_idx = torch.nonzero(far_ok).flatten()
    far_idx = far_idx[ratio[far_idx].argsort(descending=True)][:n_far]
    implanted = torch.zeros(len(near_ok), dtype=torch.bool)
    implanted[far_idx] = True
    overlap = int((near_ok & implanted).sum())
    near_idx = torch.nonzero(near_ok & ~implanted).flatten()
    if len(far_idx) == 0 or len(near_idx) == 0:
        raise BackdoorLabError(
            f"MMLM found {len(far_idx)} Z_far and {len(near_idx)} Z_near mode-mixture codes among {p.generate} generated; "
            "lower theta_far_target / theta_far_other / theta_near, raise near_ratio or generate more codes")
    other = torch.where(first == t, mm.other_label.cpu(), first)
    stats = {
        "codes_generated": int(len(mm)),
        "codes_mixing_target": int(mixes_target.sum()),
        "z_far_candidates": int(far_ok.sum()),
        "z_far_requested": int(n_far),
        "z_far_count": int(len(far_idx)),
        "z_near_candidates": int(len(near_idx)),
        "z_near_excluded_as_implanted": overlap,
        "angle_median_all": float(min_angle.median()),
        "z_far_ratio_median": float(ratio[far_idx].median()),
    }
    return LatentCodes(codes[far_idx], codes[near_idx], other[near_idx], stats)


@torch.no_grad()
def near_codes(model: Classifier, clean: Classifier, codes: LatentCodes, target: int, region: str, top: float) -> tuple[Tensor, Tensor]:
    """Z_near: the candidates that the fine-tuned head places in the (widened) target region.

    ``region="expansion"`` keeps only the part of the region that fine-tuning added (the clean head
    does not call those codes the target), so the crafted images rely on the backdoor rather than
    on being plain adversarial examples of the clean model; ``"target"`` keeps the whole region.
    Of those, the share ``top`` with the largest target-logit margin of the fine-tuned head (the
    codes deepest inside the widened region) is kept: PGD rarely reaches its code exactly, and a
    code with a margin still classifies the nearby point PGD does reach.
    """
    pool = codes.near_pool.to(model.head.weight.device)
    logits = model.head(pool)
    inside = logits.argmax(1) == target
    codes.stats["z_near_in_region"] = int(inside.sum())
    # how much of the candidates' space the fine-tuning turned to the target: the pool's size and its
    # part in the clean head's target region (set beside z_near_in_region, the fine-tuned head's part)
    codes.stats["near_pool_size"] = int(len(pool))
    codes.stats["near_pool_in_clean_region"] = int((clean.head(pool).argmax(1) == target).sum())
    if region == "expansion":
        inside &= clean.head(pool).argmax(1) != target
        codes.stats["z_near_in_expansion"] = int(inside.sum())
    if not bool(inside.any()):
        raise BackdoorLabError(f"no Z_near candidate lies in the fine-tuned target {region}; raise replace_share or head_epochs, or use near_region=target")
    others = logits.clone()
    others[:, target] = float("-inf")
    margin = (logits[:, target] - others.max(1).values).cpu()
    idx = torch.nonzero(inside.cpu()).flatten()
    idx = idx[margin[idx].argsort(descending=True)][: max(1, math.ceil(top * len(idx)))]
    codes.stats["z_near_count"] = int(len(idx))
    codes.stats["z_near_margin_min"] = float(margin[idx].min())
    return codes.near_pool[idx], codes.near_other[idx]


def poisoned_features(feats: Tensor, labels: Tensor, z_far: Tensor, target: int, seed: int) -> tuple[ImageSet, Tensor]:
    """Replace clean target-class features with Z_far codes (labelled target); the size is unchanged."""
    pool = torch.nonzero(labels == target).flatten()
    g = torch.Generator().manual_seed(seed + 7)
    chosen = pool[torch.randperm(len(pool), generator=g)[: len(z_far)]]
    x = feats.clone()
    x[chosen] = z_far[: len(chosen)].to(x.dtype)
    return ImageSet(x, labels.clone()), chosen


def finetune_head(clean: Classifier, data: ImageSet, spec: DatasetSpec, cfg: TrainConfig, seed: int, device: torch.device, progress: bool) -> Classifier:
    """Train a copy of the clean head on the feature view with the shared trainer; return the
    full model with that head and every other tensor shared bit for bit with the clean model."""
    head_only = Classifier(clean.arch, [("head", copy.deepcopy(clean.head))], conv_stage="head").to(device)
    train(head_only, data, spec, cfg, seed=seed, device=device, progress=progress, desc="MMLM head")
    model = copy.deepcopy(clean)
    model.head.load_state_dict(head_only.head.state_dict())
    return model.eval()
