"""Theory quantities of a merge, accumulated tensor by tensor while the engine merges.

    acc = TheoryAccumulator(density=0.7, width_samples=64, seed=0)
    merge_models(..., observer=acc)          # calls acc(name, taus, merged_tau) per tensor or row chunk
    acc.result() -> dict[str, float]         # docs/scaling.md defines every key

Every statistic is a sum over parameter entries (counts, a K×K Gram matrix, central moments merged with
Pébay's pairwise formulas), so a tensor observed in row chunks gives the same result as the whole tensor,
up to float64 rounding. The one whole-tensor quantity is the RHT trim threshold of each τ_i: pass it with
`thresholds=` (from `trim_threshold`) for a chunked tensor, else each chunk is trimmed on its own and
`rht_approximate_tensors` counts the tensors where that happened.

The Gaussian width w(T) = E_g[max_i <g, τ_i>], g ~ N(0, I) over all parameters, is estimated without
drawing g: the K dot products <g, τ_i> are jointly Gaussian with covariance the Gram matrix G_ij = <τ_i, τ_j>,
so sampling N(0, G) in K dimensions is the same Monte-Carlo estimator as sampling g over every parameter,
costs nothing per parameter, and G is additive over entries (chunking cannot change it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pefteval_harness.errors import BadInput

if TYPE_CHECKING:
    import torch

BLOCK_ENTRIES = 1 << 18  # entries per expert converted to float64 at a time: bounds memory for huge tensors


def trim_threshold(tau: torch.Tensor, density: float) -> float:
    """The magnitude an entry of τ needs to survive RHT's trim: the ⌊density·numel⌋-th largest |τ| of the
    whole tensor (inf when that count is 0: nothing survives; 0 when density is 1: everything does).

    Entries with |τ| >= threshold are kept, so ties at the threshold are all kept."""
    import torch

    numel = tau.numel()
    keep = math.floor(density * numel)
    if density >= 1 or keep >= numel:
        return 0.0
    if keep == 0:
        return math.inf
    magnitudes = tau.detach().reshape(-1).abs().float()
    return float(torch.kthvalue(magnitudes, numel - keep + 1).values)


class _Moments:
    """Count, mean and central moment sums M2..M4 of m streams at once (float64), merged chunk by chunk with
    the pairwise update of Pébay (2008), so any split of the entries gives the same moments."""

    def __init__(self, streams: int) -> None:
        import torch

        self.n = 0
        self.mean, self.m2, self.m3, self.m4 = (torch.zeros(streams, dtype=torch.float64) for _ in range(4))

    def add(self, block: torch.Tensor) -> None:
        """block: (streams, entries) float64."""
        nb = block.shape[1]
        if nb == 0:
            return
        import torch

        mean_b = block.mean(1)
        d = block - mean_b[:, None]
        d2 = d.square()
        m2_b, m3_b, m4_b = d2.sum(1), torch.einsum("ij,ij->i", d2, d), torch.einsum("ij,ij->i", d2, d2)
        if self.n == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = nb, mean_b, m2_b, m3_b, m4_b
            return
        na, nb, n = float(self.n), float(nb), float(self.n + nb)  # floats: the products overflow torch's int64
        delta = mean_b - self.mean
        m4 = (self.m4 + m4_b + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
              + 6 * delta**2 * (na * na * m2_b + nb * nb * self.m2) / n**2
              + 4 * delta * (na * m3_b - nb * self.m3) / n)  # fmt: skip
        m3 = (self.m3 + m3_b + delta**3 * na * nb * (na - nb) / n**2
              + 3 * delta * (na * m2_b - nb * self.m2) / n)  # fmt: skip
        self.m2 = self.m2 + m2_b + delta**2 * na * nb / n
        self.m3, self.m4 = m3, m4
        self.mean = self.mean + delta * nb / n
        self.n += block.shape[1]

    def excess_kurtosis(self) -> list[float]:
        """Per stream n·M4/M2² − 3 (population moments; 0 for a Gaussian); nan for a constant stream."""
        out = []
        for m2, m4 in zip(self.m2.tolist(), self.m4.tolist(), strict=True):
            out.append(self.n * m4 / (m2 * m2) - 3.0 if m2 > 0 else math.nan)
        return out


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


class TheoryAccumulator:
    """Streaming statistics of the task vectors τ_i = expert_i − base and of the merged task vector.

    Call `observe` (or the instance itself: it is the engine's observer) once per floating tensor, or once
    per row chunk of it in order, then `result()`. `density` is RHT's trim density ρ for the reparameterised
    τ̂_i; `width_samples` the Monte-Carlo draws of the Gaussian width; `seed` makes those draws repeatable.
    """

    def __init__(self, density: float = 0.7, width_samples: int = 64, seed: int = 0) -> None:
        if not (isinstance(density, int | float) and 0 < density <= 1):
            raise BadInput(f"TheoryAccumulator: density must be in (0, 1], got {density!r}")
        if not (isinstance(width_samples, int) and width_samples >= 2):
            raise BadInput(f"TheoryAccumulator: width_samples must be an integer >= 2, got {width_samples!r}")
        self.density = float(density)
        self.trim_density = self.density  # what the engine reads to know it should pass `thresholds=`
        self.width_samples = width_samples
        self.seed = int(seed)
        self._experts: int | None = None
        self._names: list[str] = []  # in first-seen order; the last one may still be receiving chunks
        self._chunks_of_last = 0
        self._approximate: set[str] = set()  # chunked tensors trimmed per chunk (no thresholds given)
        self._entries = 0
        self._gram = None  # K×K float64 Σ τ_i·τ_j
        self._merged_sq = 0.0
        self._eligible = 0  # entries where at least two τ_i are non-zero
        self._conflicts = 0  # ... and their signs disagree
        self._merged_changed = 0
        self._experts_changed = 0
        self._tau_moments: _Moments | None = None
        self._rht_moments: _Moments | None = None
        self._merged_moments = _Moments(1)

    def __call__(self, name: str, taus: Sequence[torch.Tensor], merged_tau: torch.Tensor,
                 thresholds: Sequence[float] | None = None) -> None:  # fmt: skip
        self.observe(name, taus, merged_tau, thresholds=thresholds)

    def observe(self, name: str, taus: Sequence[torch.Tensor], merged_tau: torch.Tensor,
                thresholds: Sequence[float] | None = None) -> None:  # fmt: skip
        """Add one tensor, or the next row chunk of the tensor `name`.

        taus: the K task vectors (same shape as merged_tau); merged_tau: merged − base. thresholds: per
        expert, `trim_threshold(whole τ_i, self.density)`; needed only when the tensor comes in chunks.
        """
        import torch

        taus = list(taus)
        if not taus:
            raise BadInput(f"theory observer: tensor {name!r} came with no task vectors")
        if self._experts is None:
            self._experts = len(taus)
            self._gram = torch.zeros(len(taus), len(taus), dtype=torch.float64)
            self._tau_moments, self._rht_moments = _Moments(len(taus)), _Moments(len(taus))
        if len(taus) != self._experts:
            raise BadInput(f"theory observer: tensor {name!r} has {len(taus)} task vectors, earlier ones had "
                           f"{self._experts}")  # fmt: skip
        shape = tuple(merged_tau.shape)
        for i, tau in enumerate(taus):
            if tuple(tau.shape) != shape:
                raise BadInput(f"theory observer: tensor {name!r}: task vector {i} has shape {tuple(tau.shape)}, "
                               f"the merged one {shape}")  # fmt: skip
        if thresholds is not None:
            thresholds = [float(t) for t in thresholds]
            if len(thresholds) != self._experts or any(math.isnan(t) or t < 0 for t in thresholds):
                raise BadInput(f"theory observer: tensor {name!r}: thresholds must be {self._experts} numbers "
                               f">= 0, got {thresholds!r}")  # fmt: skip
        self._track(name, chunked_without_thresholds=thresholds is None)
        if merged_tau.numel() == 0:
            return
        flat = [t.detach().reshape(-1) for t in taus]  # views when contiguous: no K × n copy of a huge tensor
        if thresholds is None:
            # The whole tensor is here (or this chunk stands in for it: see rht_approximate_tensors).
            thresholds = [trim_threshold(t, self.density) for t in flat]
        merged = merged_tau.detach().reshape(-1)
        cut = torch.tensor(thresholds, dtype=torch.float64)[:, None]
        for start in range(0, merged.numel(), BLOCK_ENTRIES):
            stop = start + BLOCK_ENTRIES
            block = torch.stack([t[start:stop] for t in flat]).double()
            self._add_block(block, merged[start:stop].double(), cut)

    def _track(self, name: str, chunked_without_thresholds: bool) -> None:
        """Count tensors and chunks; a name seen again after another tensor would be counted twice."""
        if self._names and self._names[-1] == name:
            self._chunks_of_last += 1
            if chunked_without_thresholds:
                self._approximate.add(name)
            return
        if name in self._names:
            raise BadInput(f"theory observer: tensor {name!r} observed again after other tensors (chunks of a "
                           "tensor must come one after another)")  # fmt: skip
        self._names.append(name)
        self._chunks_of_last = 1

    def _add_block(self, block: torch.Tensor, merged: torch.Tensor, cut: torch.Tensor) -> None:
        """block: (K, b) float64 task vector entries; merged: (b,) float64; cut: (K, 1) trim thresholds."""
        self._entries += block.shape[1]
        self._gram += block @ block.T
        self._merged_sq += float(merged.dot(merged))
        signs = block.sign()
        nonzero = signs.abs().sum(0)  # per entry: experts that changed it
        # both signs occur exactly when |Σ sign| < number of non-zero entries
        self._conflicts += int((signs.sum(0).abs_() < nonzero).sum())
        self._eligible += int((nonzero >= 2).sum())
        self._experts_changed += int((nonzero > 0).sum())
        self._merged_changed += int(merged.count_nonzero())
        self._tau_moments.add(block)
        # τ̂ = trimmed τ / ρ; kurtosis is scale-free, so the 1/ρ rescale is left out of its moments
        self._rht_moments.add(block * (block.abs() >= cut))
        self._merged_moments.add(merged[None, :])

    def gaussian_width(self, samples: int | None = None) -> tuple[float, float]:
        """Monte-Carlo w(T) = E[max_i Z_i], Z ~ N(0, G), G the task vectors' Gram matrix; and its standard
        error. Draws come from `seed` alone, so the same vectors give the same estimate."""
        import torch

        if self._gram is None:
            raise BadInput("TheoryAccumulator: nothing observed yet")
        samples = self.width_samples if samples is None else samples
        # G = V·diag(λ)·Vᵀ; Z = ξ·(V·√λ)ᵀ has covariance G even when G is singular (e.g. {τ, −τ}).
        eigenvalues, vectors = torch.linalg.eigh(self._gram)
        factor = vectors * eigenvalues.clamp(min=0).sqrt()
        generator = torch.Generator().manual_seed(self.seed)
        xi = torch.randn(samples, self._experts, generator=generator, dtype=torch.float64)
        maxima = (xi @ factor.T).max(1).values
        return float(maxima.mean()), float(maxima.std() / math.sqrt(samples))

    def result(self) -> dict[str, float]:
        """Every quantity, keyed as in docs/scaling.md; nan where undefined (e.g. kurtosis of a constant)."""
        if self._gram is None:
            raise BadInput("TheoryAccumulator: result() before any tensor was observed")
        k = self._experts
        sq_norms = self._gram.diagonal().tolist()
        norms = [math.sqrt(max(s, 0.0)) for s in sq_norms]
        mean_norm = sum(norms) / k
        cosines = [float(self._gram[i, j]) / (norms[i] * norms[j])
                   for i in range(k) for j in range(i + 1, k) if norms[i] > 0 and norms[j] > 0]  # fmt: skip
        width, width_se = self.gaussian_width()
        entries = self._entries
        return {
            "experts": float(k),
            "tensors": float(len(self._names)),
            "entries": float(entries),
            "gaussian_width": width,
            "gaussian_width_se": width_se,
            "gaussian_width_normalised": width / mean_norm if mean_norm > 0 else math.nan,
            "gaussian_width_normalised_se": width_se / mean_norm if mean_norm > 0 else math.nan,
            "sign_conflict_rate": self._conflicts / self._eligible if self._eligible else math.nan,
            "coverage_merged": self._merged_changed / entries if entries else math.nan,
            "coverage_experts": self._experts_changed / entries if entries else math.nan,
            "kurtosis_experts": _mean(self._tau_moments.excess_kurtosis()),
            "kurtosis_rht": _mean(self._rht_moments.excess_kurtosis()),
            "kurtosis_merged": self._merged_moments.excess_kurtosis()[0] if entries else math.nan,
            "norm_experts_mean": mean_norm,
            "norm_merged": math.sqrt(self._merged_sq),
            "cosine_mean": sum(cosines) / len(cosines) if cosines else math.nan,
            "rht_approximate_tensors": float(len(self._approximate)),
        }
