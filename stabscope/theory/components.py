"""Moment propagation through one transformer component at a time (numpy only).

The state is the token second-moment matrix of a (T, d) activation: ``K[i, j] = E[x_i · x_j]/d``
(uncentred, per feature, T × T over positions), with ``mean[i]`` = E[x_i] per feature. Its
diagonal is what the recorder's ``act_rms`` squares to; ``token_correlation`` is the recorder's
``token_corr`` (mean off-diagonal over mean diagonal). When every token has the same variance
σ² and every pair the same correlation r, K = σ²((1−r)I + r·11ᵀ) and each rule below reduces
to the row of Kedia et al. 2024 (Transformers Get Stable, Table 1; derivations in its
Appendix A): that is what tests/test_theory.py checks, next to Monte-Carlo runs of each
component in torch. Keeping the full matrix is what lets a causal mask be exact: with it the
tokens are no longer exchangeable (position i averages i+1 tokens).

The gradient's state is the same matrix for dL/dx, ``G[i, j] = E[g_i · g_j]/d``. Every
component caches what its backward rule needs in ``forward``; the usual mean-field
assumptions hold throughout: weights independent of each other and of the signal, width large
enough that sums over features concentrate, the gradient independent of the forward signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .gaussian import ACTIVATIONS


@dataclass
class Signal:
    """Second moments ``K`` (T, T) and mean ``mean`` (T,) of an activation, per feature."""

    K: np.ndarray
    mean: np.ndarray

    @classmethod
    def exchangeable(cls, tokens: int, variance: float, corr: float, mean: float = 0.0) -> Signal:
        """Every token variance ``variance``, every pair correlation ``corr`` (Kedia's (σ², r))."""
        second = variance + mean * mean
        K = np.full((tokens, tokens), corr * variance + mean * mean)
        np.fill_diagonal(K, second)
        return cls(K, np.full(tokens, mean))

    @property
    def second_moment(self) -> float:
        """mean over tokens of E[x²]: the square of the recorder's ``act_rms``."""
        return float(np.mean(np.diag(self.K)))


def token_correlation(K: np.ndarray, positions: np.ndarray | None = None) -> float:
    """Mean off-diagonal over mean diagonal of K, on ``positions`` (all by default)."""
    if positions is not None:
        K = K[np.ix_(positions, positions)]
    n = K.shape[0]
    if n < 2:
        return float("nan")
    diag = np.trace(K)
    return float((K.sum() - diag) / (n * (n - 1)) / (diag / n))


def _saved(value: np.ndarray | None) -> np.ndarray:
    """What ``forward`` kept for ``backward``: calling backward first is a programming error."""
    if value is None:
        raise RuntimeError("backward() called before forward()")
    return value


def _outer_diag(K: np.ndarray) -> np.ndarray:
    d = np.diag(K)
    return np.sqrt(np.maximum(np.outer(d, d), 1e-300))


class Component:
    """One step of the model: ``forward(Signal) -> Signal``, ``backward(G) -> G``."""

    def forward(self, x: Signal) -> Signal:  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, g: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Linear(Component):
    """y = W x + b, W (d_out, d_in) with entries of second moment ``std``², b of ``bias_rms``².

    Forward: K_out = d_in·σ_w²·K_in + σ_b²·11ᵀ (the bias is shared by every token, so it is
    fully correlated). Backward: G_in = d_out·σ_w²·G_out. Table 1, Linear row, with μ²_in
    already inside the uncentred K.
    """

    d_in: int
    d_out: int
    std: float
    bias_rms: float = 0.0

    def forward(self, x: Signal) -> Signal:
        K = self.d_in * self.std**2 * x.K + self.bias_rms**2
        return Signal(K, np.zeros_like(x.mean))

    def backward(self, g: np.ndarray) -> np.ndarray:
        return self.d_out * self.std**2 * g


@dataclass
class Activation(Component):
    """ReLU or GELU on zero-mean Gaussian pre-activations (closed forms in ``gaussian``)."""

    kind: str = "gelu"
    _pre: np.ndarray | None = field(default=None, repr=False)

    def forward(self, x: Signal) -> Signal:
        second, _, mean = ACTIVATIONS[self.kind]
        d = np.diag(x.K)
        self._pre = x.K
        return Signal(second(d[:, None], d[None, :], x.K), mean(d))

    def backward(self, g: np.ndarray) -> np.ndarray:
        _, slope, _ = ACTIVATIONS[self.kind]
        pre = _saved(self._pre)
        d = np.diag(pre)
        return g * slope(d[:, None], d[None, :], pre)


@dataclass
class Norm(Component):
    """LayerNorm (``centred``) or RMSNorm over ``width`` features, gain² ``gain2``, bias² ``bias2``.

    Forward: each token is divided by its rms, so K_out = gain²·K/sqrt(K_ii K_jj) + bias²: the
    correlation passes unchanged and the variance becomes the gain (Table 1, LayerNorm row).
    The features are taken as zero-mean across the width (they are after any linear layer
    with zero-mean weights), so LayerNorm's centring changes nothing else. Backward: dx =
    (gain/σ)·P·dy, G_in = gain²·G/sqrt(K_ii K_jj) (Table 1: σ²_g,in = σ²_g,out/σ²_in). P
    removes the normalised direction (and, for LayerNorm, the all-ones one): 2 of d directions
    for an isotropic gradient, and nothing inside a stack, where the gradient reaching a norm
    has already been projected by the norm after it; both are left out.
    """

    width: int
    centred: bool = True
    gain2: float = 1.0
    bias2: float = 0.0
    _scale: np.ndarray | None = field(default=None, repr=False)

    def forward(self, x: Signal) -> Signal:
        self._scale = _outer_diag(x.K)
        rho = np.clip(x.K / self._scale, -1.0, 1.0)
        return Signal(self.gain2 * rho + self.bias2, np.zeros_like(x.mean))

    def backward(self, g: np.ndarray) -> np.ndarray:
        return self.gain2 * g / _saved(self._scale)


@dataclass
class Dropout(Component):
    """Inverted dropout with drop probability ``p``, independent masks per token.

    Diagonal scaled by 1/(1−p), pairs of distinct tokens unchanged, both ways: Table 1's
    σ²_out = (σ²+μ²)/(1−p) − μ² and r_out = r·(1−p) for zero-mean inputs.
    """

    p: float

    def _scale(self, K: np.ndarray) -> np.ndarray:
        out = K.copy()
        out[np.diag_indices_from(out)] /= 1.0 - self.p
        return out

    def forward(self, x: Signal) -> Signal:
        return Signal(self._scale(x.K), x.mean.copy())

    def backward(self, g: np.ndarray) -> np.ndarray:
        return self._scale(g)


@dataclass
class Chain(Component):
    """Components applied in order; backward in reverse order."""

    parts: list[Component]

    def forward(self, x: Signal) -> Signal:
        for part in self.parts:
            x = part.forward(x)
        return x

    def backward(self, g: np.ndarray) -> np.ndarray:
        for part in reversed(self.parts):
            g = part.backward(g)
        return g


@dataclass
class Residual(Component):
    """y = α·x + β·f(x), optionally followed by a norm (Post-LN, DeepNorm).

    The branch ends in a linear layer with zero-mean weights independent of x, so x and f(x)
    are uncorrelated: K_y = α²K_x + β²K_f, and backward G_x = α²G_y + β²·J_fᵀ G_y J_f (the
    branch's own backward of G_y). Table 1's residual rule with the cross term zero at init.
    """

    branch: Component
    alpha: float = 1.0
    beta: float = 1.0
    norm: Component | None = None

    def forward(self, x: Signal) -> Signal:
        f = self.branch.forward(x)
        y = Signal(
            self.alpha**2 * x.K + self.beta**2 * f.K, self.alpha * x.mean + self.beta * f.mean
        )
        return self.norm.forward(y) if self.norm is not None else y

    def backward(self, g: np.ndarray) -> np.ndarray:
        if self.norm is not None:
            g = self.norm.backward(g)
        return self.alpha**2 * g + self.branch.backward(self.beta**2 * g)
