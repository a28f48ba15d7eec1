"""Semi-discrete optimal transport solver (AE-OT style), the engine of the MMLM attack.

Source mu (N(0, I) or uniform on [-0.5, 0.5]^d), target nu = (1/n) sum_i delta_{y_i}. Brenier
potential u_h(x) = max_i <x, y_i> + h_i, cell W_i = where i wins. Adam steps on h with the energy
gradient g_i = mu(W_i) - 1/n (Monte Carlo, Sobol by default), then h <- h - mean(h). The sample
set is fixed between growth events; it doubles when ||g|| stalls for ``stall_steps`` steps.

Speed: for a fixed sample set, S = X @ Y^T never changes, only h does. ``cache=True`` computes S
once per block of sample rows (extended on growth); ``cache=False`` recomputes the product when
needed (low-memory mode, benchmark baseline). With ``candidates = K`` (default 32) a step looks at
each sample's K best cells only, with a bound that proves the answer equals the full argmax
(:mod:`.candidates`): a step costs O(N·K) instead of O(N·n), and S is read only at refreshes.
``candidates = 0`` takes the full argmax(S + h) every step. Every mode gives the same cells, so
the same h trajectories.
Targets are rescaled first (``OTConfig.scaling``); ``to_original`` maps codes back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from backdoorlab.errors import ConfigError
from backdoorlab.ot.candidates import CandidateCells

SOURCES = ("gaussian", "uniform")
SCALINGS = ("none", "center", "standardize", "zscore")
_SOBOL_MAX_DIM = 21201  # limit of torch.quasirandom.SobolEngine
_RNG_CHUNK = 8192  # pseudo-random samples are generated in chunks keyed by (seed, chunk index)
_CHUNK_BYTES = 4 * 2**20  # temporary (rows x n) buffer of the argmax pass
_GROUP = 64  # column group width of the two-level argmax


@dataclass
class OTConfig:
    """Settings of :class:`SemiDiscreteOT`. Defaults follow AE-OT's public code and the MMLM paper.

    scaling: how targets are normalised before transport (the OT runs on (y - shift) / scale):
      "none"; "center" (subtract the mean); "standardize" (default: subtract the mean and divide
      by one scalar, the root mean per-coordinate variance, so the cloud keeps its shape and has
      the spread of the N(0, I) source); "zscore" (per-coordinate mean and std; constant
      coordinates keep scale 1).
    lr_decay (our choice, 1.0 = AE-OT's constant lr): lr is multiplied by it whenever ||g|| stalls
      for stall_steps steps (at each doubling, and every stall_steps once at max_samples). Adam
      with a constant lr can cycle around the optimum without reaching tol when some cells are
      thin (seen with the uniform source); halving it lets the fit settle.
    block_size: rows of S per matrix product; None = as many rows as fit in ``block_memory``
      bytes. cache_memory: bytes of S kept cached; rows beyond it are recomputed every step.
    """

    source: str = "gaussian"
    quasi_random: bool = True
    n_samples: int = 20_000
    max_samples: int = 640_000
    lr: float = 5e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    tol: float = 2e-3
    max_iter: int = 2000
    stall_steps: int = 30
    lr_decay: float = 0.5
    cache: bool = True
    candidates: int = 32
    refresh_fraction: float = 0.005
    block_size: int | None = None
    block_memory: int = 128 * 2**20
    cache_memory: int = 4 * 2**30
    scaling: str = "standardize"
    seed: int = 0

    def __post_init__(self) -> None:
        def _int(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(name, f"must be an integer >= {lo}, got {v!r}")

        def _pos(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(name, f"must be a finite number > 0, got {v!r}")

        if self.source not in SOURCES:
            raise ConfigError("source", f"must be one of {SOURCES}, got {self.source!r}")
        if self.scaling not in SCALINGS:
            raise ConfigError("scaling", f"must be one of {SCALINGS}, got {self.scaling!r}")
        for name in ("quasi_random", "cache"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be True or False, got {getattr(self, name)!r}")
        for name, lo in (("n_samples", 1), ("max_samples", 1), ("max_iter", 1), ("stall_steps", 1),
                         ("seed", 0), ("block_memory", 1), ("cache_memory", 0), ("candidates", 0)):
            _int(name, lo)
        if self.max_samples < self.n_samples:
            raise ConfigError("max_samples", f"must be >= n_samples ({self.n_samples}), got {self.max_samples}")
        if self.block_size is not None:
            _int("block_size", 1)
        for name in ("lr", "eps", "tol", "lr_decay", "refresh_fraction"):
            _pos(name)
        if self.lr_decay > 1:
            raise ConfigError("lr_decay", f"must be in (0, 1], got {self.lr_decay!r}")
        b = self.betas
        if (not isinstance(b, (tuple, list)) or len(b) != 2
                or not all(isinstance(x, (int, float)) and 0.0 <= x < 1.0 for x in b)):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {b!r}")
        self.betas = (float(b[0]), float(b[1]))


@dataclass
class OTResult:
    """Outcome of one :meth:`SemiDiscreteOT.fit` call (history covers this call only)."""

    steps: int  # total optimisation steps taken by the solver so far
    iterations: int  # steps taken in this call
    grad_norm: float  # last measured ||g||_2
    n_samples: int
    converged: bool
    wall_time: float
    cache_build_time: float  # seconds spent building/extending the S cache in total
    grad_norms: list[float] = field(default_factory=list)
    sample_counts: list[int] = field(default_factory=list)


def _scaling(y: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = y.shape[1]
    zero, one = torch.zeros(d, device=y.device), torch.ones(d, device=y.device)
    if mode == "none":
        return zero, one
    mean = y.mean(0)
    if mode == "center":
        return mean, one
    var = y.var(0, unbiased=False)
    if mode == "standardize":
        s = float(var.mean().sqrt())
        return mean, one * (s if s > 0 else 1.0)
    std = var.sqrt()
    return mean, torch.where(std > 1e-12 * max(float(std.max()), 1.0), std, one)


class SemiDiscreteOT:
    """Semi-discrete OT from ``config.source`` to the uniform measure on the rows of ``targets``.

    All tensors live on ``device`` (default: the device of ``targets``); computation is float32.
    Points passed to :meth:`assign` live in the source space; targets are stored scaled.
    """

    def __init__(self, targets: torch.Tensor, config: OTConfig | None = None,
                 device: str | torch.device | None = None) -> None:
        cfg = OTConfig() if config is None else config
        if not isinstance(cfg, OTConfig):
            raise ConfigError("config", f"must be an OTConfig, got {type(cfg).__name__}")
        y = torch.as_tensor(targets)
        if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 1:
            raise ConfigError("targets", f"must be an (n >= 2, d >= 1) matrix, got shape {tuple(y.shape)}")
        self.device = torch.device(device) if device is not None else y.device
        y = y.to(self.device, torch.float32)
        if not bool(torch.isfinite(y).all()):
            raise ConfigError("targets", "contains NaN or infinite values")
        self.config = cfg
        self.n, self.dim = y.shape
        if cfg.quasi_random and self.dim > _SOBOL_MAX_DIM:
            raise ConfigError("quasi_random", f"Sobol sampling supports d <= {_SOBOL_MAX_DIM}, got d = {self.dim}")
        self.shift, self.scale = _scaling(y, cfg.scaling)
        self.targets = ((y - self.shift) / self.scale).contiguous()  # scaled targets, (n, d)
        self._yt = self.targets.t()
        self.block_size = cfg.block_size or max(1, cfg.block_memory // (4 * self.n))
        # argmax in two levels (max of groups of _GROUP columns, then inside the winning group):
        # about twice as fast as a plain argmax on CPU for many targets, same first-index ties
        self._group = _GROUP if self.n >= 8 * _GROUP else 0
        width = -(-self.n // _GROUP) * _GROUP if self._group else self.n
        self._chunk = max(1, min(self.block_size, _CHUNK_BYTES // (4 * width)))
        self._buf = torch.full((self._chunk, width), -torch.inf, device=self.device)
        self._rows = torch.arange(self._chunk, device=self.device)
        self._sbuf: torch.Tensor | None = None
        self.cache_build_time = 0.0
        self._reset()

    def _reset(self) -> None:
        z = lambda: torch.zeros(self.n, device=self.device)  # noqa: E731
        self.h, self._m, self._v = z(), z(), z()
        self.step_count = 0
        self.lr = self.config.lr
        self._best = math.inf
        self._stall = 0
        self.last_grad_norm = math.nan
        self._x = torch.empty(0, self.dim, device=self.device)
        self._bounds = [0]
        self._cache: list[torch.Tensor | None] = []
        self._cached_bytes = 0
        self._engine = None
        self._drawn = 0
        self._cand = CandidateCells(self.config.candidates, self.config.refresh_fraction) if self.config.candidates else None

    @property
    def n_samples(self) -> int:
        """Current size of the Monte Carlo sample set (0 before the first step)."""
        return self._x.shape[0]

    @property
    def samples(self) -> torch.Tensor:
        """The current Monte Carlo sample set, (N, d), in the source space."""
        self._ensure_samples()
        return self._x

    def _draw(self, count: int) -> torch.Tensor:
        """Next ``count`` samples of the deterministic stream fixed by (seed, source, quasi_random)."""
        cfg, start = self.config, self._drawn
        gauss = cfg.source == "gaussian"
        if cfg.quasi_random:  # Sobol points; Gaussian through the inverse normal CDF
            if self._engine is None:
                self._engine = torch.quasirandom.SobolEngine(self.dim, scramble=True, seed=cfg.seed)
            u = self._engine.draw(count, dtype=torch.float64)
            x = torch.special.ndtri(u.clamp(1e-12, 1.0 - 1e-12)) if gauss else u - 0.5
        else:  # chunk c of the stream comes from its own generator, so any prefix regenerates
            parts = []
            for c in range(start // _RNG_CHUNK, (start + count - 1) // _RNG_CHUNK + 1):
                gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + c) % 2**63)
                blk = torch.randn(_RNG_CHUNK, self.dim, generator=gen) if gauss else \
                    torch.rand(_RNG_CHUNK, self.dim, generator=gen) - 0.5
                parts.append(blk[max(start - c * _RNG_CHUNK, 0): start + count - c * _RNG_CHUNK])
            x = torch.cat(parts)
        self._drawn += count
        return x.to(self.device, torch.float32)

    def _add_samples(self, count: int, bounds: list[int] | None = None) -> None:
        start = self.n_samples
        self._x = torch.cat([self._x, self._draw(count)]) if start else self._draw(count)
        end = self.n_samples
        if bounds is None:
            bounds = list(range(start + self.block_size, end, self.block_size)) + [end]
        t0 = time.perf_counter()
        for b in bounds:
            s, blk = self._bounds[-1], None
            nbytes = 4 * (b - s) * self.n
            if self.config.cache and self._cached_bytes + nbytes <= self.config.cache_memory:
                blk = torch.mm(self._x[s:b], self._yt, out=torch.empty(b - s, self.n, device=self.device))
                self._cached_bytes += nbytes
            self._bounds.append(b)
            self._cache.append(blk)
        if self.config.cache:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.cache_build_time += time.perf_counter() - t0
        if self._cand is not None:
            self._cand.invalidate()

    def _ensure_samples(self) -> None:
        if self.n_samples == 0:
            self._add_samples(self.config.n_samples)

    def _block_scores(self, b: int) -> torch.Tensor:
        s, e = self._bounds[b], self._bounds[b + 1]
        blk = self._cache[b]
        if blk is not None:
            return blk
        if self._sbuf is None or self._sbuf.shape[0] < e - s:
            self._sbuf = torch.empty(self.block_size, self.n, device=self.device)
        return torch.mm(self._x[s:e], self._yt, out=self._sbuf[: e - s])

    def sample_assignments(self) -> torch.Tensor:
        """Cell index of every Monte Carlo sample under the current h, (N,) long."""
        self._ensure_samples()
        if self._cand is not None:
            if self._cand.cells is None:
                blocks = ((self._bounds[b], self._bounds[b + 1], self._block_scores(b)) for b in range(len(self._cache)))
                self._cand.refresh(self.h, self.n_samples, blocks)
            idx, bad = self._cand.assign(self.h, lambda rows: self._x[rows] @ self._yt)
            if self._cand.stale(self.n_samples, bad):
                self._cand.invalidate()
            return idx
        idx = torch.empty(self.n_samples, dtype=torch.long, device=self.device)
        for b in range(len(self._cache)):
            s, e = self._bounds[b], self._bounds[b + 1]
            scores = self._block_scores(b)
            for r in range(0, e - s, self._chunk):
                r2 = min(r + self._chunk, e - s)
                self._argmax_into(scores[r:r2], idx[s + r: s + r2])
        return idx

    def _argmax_into(self, scores: torch.Tensor, out: torch.Tensor) -> None:
        """out <- argmax_i (scores[:, i] + h_i) for at most ``self._chunk`` rows (first index on ties)."""
        r = scores.shape[0]
        buf = self._buf[:r]
        torch.add(scores, self.h, out=buf[:, : self.n])
        if not self._group:
            torch.argmax(buf, dim=1, out=out)
            return
        grouped = buf.view(r, -1, self._group)  # padding columns hold -inf
        g = grouped.amax(2).argmax(1)
        torch.add(g * self._group, grouped[self._rows[:r], g].argmax(1), out=out)

    def cell_masses(self) -> torch.Tensor:
        """Fraction of the current sample set in each cell, (n,)."""
        counts = torch.bincount(self.sample_assignments(), minlength=self.n)
        return counts.to(torch.float32) / self.n_samples

    def gradient(self) -> torch.Tensor:
        """Energy gradient g = mu(W_i) - 1/n estimated on the current sample set."""
        return self.cell_masses() - 1.0 / self.n

    def _apply(self, g: torch.Tensor, gnorm: float) -> None:
        b1, b2 = self.config.betas
        t = self.step_count + 1
        self._m.mul_(b1).add_(g, alpha=1 - b1)
        self._v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self._v / (1 - b2**t)).sqrt_().add_(self.config.eps)
        self.h.addcdiv_(self._m, denom, value=-self.lr / (1 - b1**t))
        self.h.sub_(self.h.mean())
        self.step_count = t
        if gnorm < self._best:
            self._best, self._stall = gnorm, 0
        else:
            self._stall += 1
        if self._stall >= self.config.stall_steps:
            self.lr *= self.config.lr_decay
            self._stall = 0
            if self.n_samples < self.config.max_samples:
                self._add_samples(min(2 * self.n_samples, self.config.max_samples) - self.n_samples)
                self._best = math.inf  # norms on the new sample set are not comparable

    def _measure(self) -> tuple[torch.Tensor, float]:
        g = self.gradient()
        self.last_grad_norm = float(torch.linalg.vector_norm(g))
        return g, self.last_grad_norm

    def step(self) -> float:
        """One optimisation step (gradient, Adam update, growth check); returns ||g|| before it."""
        g, gnorm = self._measure()
        self._apply(g, gnorm)
        return gnorm

    def fit(self, progress: bool | Callable[[dict[str, Any]], None] = False,
            max_iter: int | None = None) -> OTResult:
        """Run until ||g||_2 < tol or ``max_iter`` steps (default ``config.max_iter``) in this call.

        ``progress``: True shows a tqdm bar; a callable gets {"step", "grad_norm", "n_samples"}
        after every measured gradient. Calling fit again continues from the current state.
        """
        iters = self.config.max_iter if max_iter is None else max_iter
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ConfigError("max_iter", f"must be an integer >= 0, got {iters!r}")
        from tqdm.auto import tqdm

        bar = tqdm(total=iters, desc="semi-discrete OT", leave=False) if progress is True else None
        t0 = time.perf_counter()
        norms: list[float] = []
        counts: list[int] = []
        try:
            for _ in range(iters + 1):
                g, gnorm = self._measure()
                norms.append(gnorm)
                counts.append(self.n_samples)
                if callable(progress):
                    progress({"step": self.step_count, "grad_norm": gnorm, "n_samples": self.n_samples})
                converged = gnorm < self.config.tol
                if converged or len(norms) > iters:
                    break
                self._apply(g, gnorm)
                if bar is not None:
                    bar.set_postfix(grad=f"{gnorm:.2e}", samples=self.n_samples, refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return OTResult(self.step_count, len(norms) - 1, norms[-1], self.n_samples, converged,
                        time.perf_counter() - t0, self.cache_build_time, norms, counts)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Cell index (argmax_i <x, y_i> + h_i) of source-space points x, (m, d) -> (m,) long."""
        x = self._check_points(x)
        out = torch.empty(x.shape[0], dtype=torch.long, device=self.device)
        for r in range(0, x.shape[0], self._chunk):
            self._argmax_into(x[r: r + self._chunk] @ self._yt, out[r: r + self._chunk])
        return out

    def sample_source(self, m: int, seed: int | None = None) -> torch.Tensor:
        """m fresh pseudo-random draws of the source measure, independent of the training samples
        (default seed: config.seed + 7919)."""
        gen = torch.Generator().manual_seed(self.config.seed + 7919 if seed is None else seed)
        if self.config.source == "gaussian":
            x = torch.randn(m, self.dim, generator=gen)
        else:
            x = torch.rand(m, self.dim, generator=gen) - 0.5
        return x.to(self.device)

    def to_original(self, z: torch.Tensor) -> torch.Tensor:
        """Map codes from the scaled target space back to the caller's feature space."""
        return z * self.scale + self.shift

    def to_scaled(self, y: torch.Tensor) -> torch.Tensor:
        """Map feature-space points into the scaled space the OT works in."""
        return (y.to(self.device, torch.float32) - self.shift) / self.scale

    def _check_points(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).to(self.device, torch.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ConfigError("x", f"must be an (m, {self.dim}) matrix, got shape {tuple(x.shape)}")
        return x

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain ints/floats: h, Adam moments, step and stall counters, and what
        regenerates the exact sample set (seed, source, quasi flag, count, block bounds)."""
        return {
            "h": self.h.detach().cpu().clone(), "adam_m": self._m.cpu().clone(), "adam_v": self._v.cpu().clone(),
            "shift": self.shift.cpu().clone(), "scale": self.scale.cpu().clone(),
            "block_bounds": torch.tensor(self._bounds, dtype=torch.long),
            "step": self.step_count, "lr": self.lr, "n_samples": self.n_samples, "best_grad_norm": self._best,
            "stall_count": self._stall, "seed": self.config.seed, "quasi_random": int(self.config.quasi_random),
            "source": SOURCES.index(self.config.source), "n_targets": self.n, "dim": self.dim,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (0-d tensors stand for ints/floats; keep floats float64 for
        a bit-exact resume); the sample set and the S cache are rebuilt from the seed."""
        as_num = lambda k: state[k].item() if torch.is_tensor(state[k]) else state[k]  # noqa: E731
        as_int = lambda k: int(as_num(k))  # noqa: E731
        checks = {"n_targets": self.n, "dim": self.dim, "seed": self.config.seed,
                  "quasi_random": int(self.config.quasi_random), "source": SOURCES.index(self.config.source)}
        for key, want in checks.items():
            if key not in state or as_int(key) != want:
                raise ConfigError(key, f"state has {state.get(key)!r}, this solver has {want!r}")
        bounds = [int(b) for b in torch.as_tensor(state["block_bounds"]).tolist()]
        n_samples = as_int("n_samples")
        if bounds[0] != 0 or bounds[-1] != n_samples or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ConfigError("block_bounds", "must rise strictly from 0 to n_samples")
        for key, ref in (("shift", self.shift), ("scale", self.scale)):
            if not torch.allclose(torch.as_tensor(state[key]).to(ref), ref, rtol=1e-5, atol=1e-6):
                raise ConfigError(key, "the state was fitted on differently scaled targets")
        self._reset()
        for name, key in (("h", "h"), ("_m", "adam_m"), ("_v", "adam_v")):
            t = torch.as_tensor(state[key]).to(self.device, torch.float32)
            if t.shape != (self.n,):
                raise ConfigError(key, f"must have shape ({self.n},), got {tuple(t.shape)}")
            setattr(self, name, t.clone())
        self.step_count = as_int("step")
        self._stall = as_int("stall_count")
        self._best, self.lr = float(as_num("best_grad_norm")), float(as_num("lr"))
        if n_samples:
            self._add_samples(n_samples, bounds[1:])
