"""Parameter-change audit (MMLM Tables 4-5): what an attack changed relative to the clean model."""

from __future__ import annotations

import torch
from torch import nn

# decade edges of |change| for the Table-5-style histogram (our choice: the paper's milestone was lost)
EDGES = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, float("inf"))


def parameter_audit(clean: nn.Module, modified: nn.Module, threshold: float = 1e-6, head_prefix: str = "stages.head.") -> dict:
    """Count parameters that differ by more than ``threshold`` overall and outside the head.

    Also checks the batch-norm buffers and reports whether everything outside the head is equal
    bit for bit, with a histogram of the change magnitudes of the changed parameters.
    """
    a = dict(clean.named_parameters())
    b = dict(modified.named_parameters())
    if a.keys() != b.keys():
        raise ValueError("the two models do not have the same parameters")
    total = changed = changed_out = 0
    counts = torch.zeros(len(EDGES) - 1, dtype=torch.long)
    per_tensor: dict[str, int] = {}
    for name, pa in a.items():
        d = (b[name].detach().cpu().double() - pa.detach().cpu().double()).abs().flatten()
        n = int((d > threshold).sum())
        total += d.numel()
        changed += n
        if not name.startswith(head_prefix):
            changed_out += n
        if n:
            per_tensor[name] = n
            dd = d[d > threshold]
            counts += torch.histogram(dd.clamp_max(1e30), bins=torch.tensor(EDGES[:-1] + (1e30,), dtype=torch.double)).hist.long()
    bufs_a, bufs_b = dict(clean.named_buffers()), dict(modified.named_buffers())
    outside_equal = all(torch.equal(b[n].cpu(), p.cpu()) for n, p in a.items() if not n.startswith(head_prefix))
    outside_equal = outside_equal and all(torch.equal(bufs_b[n].cpu(), t.cpu()) for n, t in bufs_a.items() if not n.startswith(head_prefix))
    labels = [f"[{lo:g}, {hi:g})" for lo, hi in zip(EDGES[:-1], EDGES[1:])]
    return {
        "threshold": threshold,
        "total_parameters": total,
        "changed_parameters": changed,
        "changed_fraction": changed / max(1, total),
        "changed_parameters_outside_head": changed_out,
        "outside_head_bitwise_equal": bool(outside_equal),
        "change_histogram": dict(zip(labels, counts.tolist())),
        "changed_per_tensor": per_tensor,
    }
