"""Semi-discrete optimal transport solver (AE-OT style), the engine of the MMLM attack.

Source measure mu (standard Gaussian, or uniform on [-0.5, 0.5]^d) on R^d, target measure
nu = (1/n) sum_i delta_{y_i}. The Brenier potential is u_h(x) = max_i (<x, y_i> + h_i) and the
cell W_i is where index i attains the max. The convex energy is minimised by Adam steps on h with
the gradient g_i = mu(W_i) - 1/n, mu(W_i) estimated by Monte Carlo (Sobol by default), followed by
h <- h - mean(h). The sample set stays fixed between growth events; when ||g|| has not improved
for ``stall_steps`` steps it is doubled (up to ``max_samples``).

Speed: for a fixed sample set X the products S = X @ Y^T never change, only h does. With
``cache=True`` S is computed once per block of sample rows (and extended when the sample set
grows), so a step is a single pass of ``argmax(S + h)``. With ``cache=False`` the product is
recomputed every step (low-memory mode and benchmark baseline). Both compute every block of S
with the same call on the same rows, so they produce bit-identical h trajectories.

Targets are optionally rescaled (``OTConfig.scaling``) before transport; ``to_original`` maps
codes built from the scaled targets back to the caller's feature space.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from backdoorlab.errors import ConfigError

SOURCES = ("gaussian", "uniform")
SCALINGS = ("none", "center", "standardize", "zscore")
_SOBOL_MAX_DIM = 21201  # limit of torch.quasirandom.SobolEngine
_RNG_CHUNK = 8192  # pseudo-random samples are generated in chunks keyed by (seed, chunk index)
_CHUNK_BYTES = 4 * 2**20  # temporary (rows x n) buffer of the argmax pass


@dataclass
class OTConfig:
    """Settings of :class:`SemiDiscreteOT`. Defaults follow AE-OT's public code and the MMLM paper.

    scaling: how targets are normalised before transport (the OT runs on (y - shift) / scale):
      "none"; "center" (subtract the mean); "standardize" (default: subtract the mean and divide
      by one scalar, the root mean per-coordinate variance, so the cloud keeps its shape and has
      the spread of the N(0, I) source); "zscore" (per-coordinate mean and std; constant
      coordinates keep scale 1).
    block_size: rows of S computed per matrix product; None = as many rows as fit in
      ``block_memory`` bytes. cache_memory: bytes of S kept in the cache; rows beyond it are
      recomputed every step (so a huge sample set degrades gracefully instead of failing).
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
        _int("n_samples", 1)
        _int("max_samples", 1)
        if self.max_samples < self.n_samples:
            raise ConfigError("max_samples", f"must be >= n_samples ({self.n_samples}), got {self.max_samples}")
        _int("max_iter", 1)
        _int("stall_steps", 1)
        _int("seed", 0)
        _int("block_memory", 1)
        _int("cache_memory", 0)
        if self.block_size is not None:
            _int("block_size", 1)
        for name in ("lr", "eps", "tol", "lr_decay"):
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
        self._chunk = max(1, min(self.block_size, _CHUNK_BYTES // (4 * self.n)))
        self._buf = torch.empty(self._chunk, self.n, device=self.device)
        self._sbuf: torch.Tensor | None = None
        self.cache_build_time = 0.0
        self._reset()

    # ----------------------------------------------------------------- state
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

    @property
    def n_samples(self) -> int:
        """Current size of the Monte Carlo sample set (0 before the first step)."""
        return self._x.shape[0]

    @property
    def samples(self) -> torch.Tensor:
        """The current Monte Carlo sample set, (N, d), in the source space."""
        self._ensure_samples()
        return self._x

    # --------------------------------------------------------------- samples
    def _draw(self, count: int) -> torch.Tensor:
        """Next ``count`` samples of the deterministic stream fixed by (seed, source, quasi_random)."""
        cfg, start = self.config, self._drawn
        if cfg.quasi_random:
            if self._engine is None:
                self._engine = torch.quasirandom.SobolEngine(self.dim, scramble=True, seed=cfg.seed)
            u = self._engine.draw(count, dtype=torch.float64)
            if cfg.source == "gaussian":
                x = torch.special.ndtri(u.clamp(1e-12, 1.0 - 1e-12))
            else:
                x = u - 0.5
        else:
            parts = []
            for c in range(start // _RNG_CHUNK, (start + count - 1) // _RNG_CHUNK + 1):
                gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + c) % 2**63)
                shape = (_RNG_CHUNK, self.dim)
                blk = torch.randn(shape, generator=gen) if cfg.source == "gaussian" else torch.rand(shape, generator=gen) - 0.5
                lo, hi = max(start, c * _RNG_CHUNK) - c * _RNG_CHUNK, min(start + count, (c + 1) * _RNG_CHUNK) - c * _RNG_CHUNK
                parts.append(blk[lo:hi])
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
            s = self._bounds[-1]
            self._bounds.append(b)
            blk = None
            nbytes = 4 * (b - s) * self.n
            if self.config.cache and self._cached_bytes + nbytes <= self.config.cache_memory:
                blk = torch.mm(self._x[s:b], self._yt, out=torch.empty(b - s, self.n, device=self.device))
                self._cached_bytes += nbytes
            self._cache.append(blk)
        if self.config.cache:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.cache_build_time += time.perf_counter() - t0

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
        idx = torch.empty(self.n_samples, dtype=torch.long, device=self.device)
        h, buf, c = self.h, self._buf, self._chunk
        for b in range(len(self._cache)):
            s, e = self._bounds[b], self._bounds[b + 1]
            scores = self._block_scores(b)
            for r in range(0, e - s, c):
                r2 = min(r + c, e - s)
                torch.add(scores[r:r2], h, out=buf[: r2 - r])
                torch.argmax(buf[: r2 - r], dim=1, out=idx[s + r: s + r2])
        return idx

    def cell_masses(self) -> torch.Tensor:
        """Fraction of the current sample set in each cell, (n,)."""
        counts = torch.bincount(self.sample_assignments(), minlength=self.n)
        return counts.to(torch.float32) / self.n_samples

    def gradient(self) -> torch.Tensor:
        """Energy gradient g = mu(W_i) - 1/n estimated on the current sample set."""
        return self.cell_masses() - 1.0 / self.n

    # ------------------------------------------------------------ optimiser
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

    def step(self) -> float:
        """One optimisation step (gradient, Adam update, growth check); returns ||g|| before it."""
        g = self.gradient()
        gnorm = float(torch.linalg.vector_norm(g))
        self.last_grad_norm = gnorm
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
        bar = None
        if progress is True:
            from tqdm.auto import tqdm
            bar = tqdm(total=iters, desc="semi-discrete OT", leave=False)
        t0 = time.perf_counter()
        norms: list[float] = []
        counts: list[int] = []
        converged = False
        try:
            for _ in range(iters + 1):
                g = self.gradient()
                gnorm = float(torch.linalg.vector_norm(g))
                self.last_grad_norm = gnorm
                norms.append(gnorm)
                counts.append(self.n_samples)
                info = {"step": self.step_count, "grad_norm": gnorm, "n_samples": self.n_samples}
                if callable(progress):
                    progress(info)
                if gnorm < self.config.tol:
                    converged = True
                    break
                if len(norms) > iters:
                    break
                self._apply(g, gnorm)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(grad=f"{gnorm:.2e}", samples=self.n_samples)
        finally:
            if bar is not None:
                bar.close()
        return OTResult(self.step_count, len(norms) - 1, norms[-1], self.n_samples, converged,
                        time.perf_counter() - t0, self.cache_build_time, norms, counts)

    # ------------------------------------------------------------ queries
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Cell index (argmax_i <x, y_i> + h_i) of source-space points x, (m, d) -> (m,) long."""
        x = self._check_points(x)
        out = torch.empty(x.shape[0], dtype=torch.long, device=self.device)
        for r in range(0, x.shape[0], self._chunk):
            out[r: r + self._chunk] = (x[r: r + self._chunk] @ self._yt).add_(self.h).argmax(1)
        return out

    def sample_source(self, m: int, seed: int | None = None) -> torch.Tensor:
        """m fresh pseudo-random draws of the source measure (independent of the training set)."""
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

    # -------------------------------------------------------- checkpoints
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
        """Restore a :meth:`state_dict`; the sample set and the S cache are rebuilt from the seed."""
        as_int = lambda k: int(state[k].item() if torch.is_tensor(state[k]) else state[k])  # noqa: E731
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
        as_float = lambda k: float(state[k].item() if torch.is_tensor(state[k]) else state[k])  # noqa: E731
        self._best, self.lr = as_float("best_grad_norm"), as_float("lr")
        if n_samples:
            self._add_samples(n_samples, bounds[1:])
