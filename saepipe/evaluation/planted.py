"""Planted-dictionary data: activations built from known sparse atoms, and how well an SAE finds them.

A ``PlantedDictionary`` holds ``n_atoms`` random unit vectors ("atoms") in ``d`` dimensions, a
Zipf frequency per atom (atom ``i``, in a random order, has weight ``(rank + 1) ** -zipf``), a
constant offset and a noise level. ``sample(n, seed)`` draws rows

    x = sum_{i in S} c_i * atom_i + offset + noise,   c_i ~ LogNormal(0, magnitude_sigma)

where ``S`` holds exactly ``s`` distinct atoms drawn by frequency without replacement (``exact``,
the Gumbel top-s trick), or each atom independently with probability ``min(1, s * p_i)`` (about
``s`` per row). A TopK SAE with ``k = s`` and ``n_latents >= n_atoms`` can in principle recover
every atom as a decoder row; the scores:

- ``mmcs(atoms, W_dec)``: mean over the atoms of the best cosine with any decoder row (1 = all found);
- ``recovered(atoms, W_dec, 0.9)``: fraction of atoms with such a cosine >= 0.9;
- ``reconstruct(weights, x, k)`` / ``fvu(weights, x, k)``: any TopK SAE given as plain arrays
  (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and optional input ``mean``/``scale``), so that SAEs
  trained by other libraries are scored by the same code.

numpy only (no MLX): used by tests and ``benchmarks/`` alike (``tests/test_planted.py``,
``benchmarks/planted_gap.py``, ``benchmarks/quality.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlantedDictionary:
    atoms: np.ndarray
    """(n_atoms, d) float64 unit rows."""
    probs: np.ndarray
    """(n_atoms,) frequency weights, summing to 1."""
    offset: np.ndarray
    """(d,) constant added to every row."""
    s: int
    """Active atoms per row (exactly, or on average when not ``exact``)."""
    magnitude_sigma: float = 0.5
    noise: float = 0.01
    exact: bool = True

    @property
    def d(self) -> int:
        return self.atoms.shape[1]

    @property
    def n_atoms(self) -> int:
        return self.atoms.shape[0]

    @classmethod
    def create(cls, d: int, n_atoms: int, s: int, *, zipf: float = 1.0, magnitude_sigma: float = 0.5,
               offset_norm: float = 2.0, noise: float = 0.01, exact: bool = True,
               seed: int = 0) -> PlantedDictionary:
        """Random unit atoms, Zipf(``zipf``) frequencies in a random order, an offset of norm
        ``offset_norm`` in a random direction; ``noise`` is the per-dimension noise std."""
        if not 1 <= s <= n_atoms:
            raise ValueError(f"s must be in 1..n_atoms={n_atoms}, got {s}")
        rng = np.random.default_rng([seed, 1])
        atoms = rng.standard_normal((n_atoms, d))
        atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
        weights = (np.arange(n_atoms) + 1.0) ** -float(zipf)
        probs = rng.permutation(weights / weights.sum())
        direction = rng.standard_normal(d)
        offset = offset_norm * direction / np.linalg.norm(direction)
        return cls(atoms, probs, offset, int(s), float(magnitude_sigma), float(noise), bool(exact))

    def codes(self, n: int, seed: int, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """(active mask (n, n_atoms) bool, coefficients (n, n_atoms) float32, zero where inactive)."""
        rng = np.random.default_rng([seed, 2])
        mask = np.zeros((n, self.n_atoms), bool)
        logp = np.log(self.probs)
        rate = np.minimum(1.0, self.s * self.probs)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            if self.exact:
                keys = logp + rng.gumbel(size=(m, self.n_atoms))
                top = np.argpartition(-keys, self.s - 1, axis=1)[:, : self.s]
                np.put_along_axis(mask[start : start + m], top, True, axis=1)
            else:
                mask[start : start + m] = rng.random((m, self.n_atoms)) < rate
        coef = np.where(mask, rng.lognormal(0.0, self.magnitude_sigma, size=mask.shape), 0.0)
        return mask, coef.astype(np.float32)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``n`` rows (float32), reproducible from ``seed``."""
        _, coef = self.codes(n, seed)
        x = coef.astype(np.float64) @ self.atoms + self.offset
        x += self.noise * np.random.default_rng([seed, 3]).standard_normal(x.shape)
        return x.astype(np.float32)


def best_cosines(atoms: np.ndarray, W_dec: np.ndarray) -> np.ndarray:
    """(n_atoms,) the best cosine of each atom with any row of ``W_dec`` (d_hidden, d)."""
    a = np.asarray(atoms, np.float64)
    w = np.asarray(W_dec, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    return (a @ w.T).max(axis=1)


def mmcs(atoms: np.ndarray, W_dec: np.ndarray) -> float:
    """Mean over atoms of the best cosine with a decoder row."""
    return float(best_cosines(atoms, W_dec).mean())


def recovered(atoms: np.ndarray, W_dec: np.ndarray, threshold: float = 0.9) -> float:
    """Fraction of atoms whose best cosine with a decoder row is >= ``threshold``."""
    return float((best_cosines(atoms, W_dec) >= threshold).mean())


def encode(weights: dict, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k code (values, indices), each (n, k), of a TopK SAE given as arrays (see module doc).

    ``pre = ReLU(((x - mean) / scale - b_dec) @ W_enc.T + b_enc)``; the k largest entries per row."""
    xn = _normalize(weights, x)
    pre = np.maximum((xn - weights["b_dec"]) @ np.asarray(weights["W_enc"], np.float32).T + weights["b_enc"], 0)
    idx = np.argpartition(-pre, k - 1, axis=1)[:, :k]
    return np.take_along_axis(pre, idx, axis=1), idx


def reconstruct(weights: dict, x: np.ndarray, k: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction (n, d) in input units, how often each latent fired (d_hidden,))."""
    x = np.asarray(x, np.float32)
    W_dec = np.asarray(weights["W_dec"], np.float32)
    out = np.empty_like(x)
    fired = np.zeros(W_dec.shape[0], np.int64)
    for start in range(0, len(x), chunk):
        v, i = encode(weights, x[start : start + chunk], k)
        xh = np.einsum("nk,nkd->nd", v, W_dec[i]) + weights["b_dec"]
        out[start : start + chunk] = xh * weights.get("scale", 1.0) + weights.get("mean", 0.0)
        np.add.at(fired, i[v > 0], 1)
    return out, fired


def fvu(weights: dict, x: np.ndarray, k: int) -> float:
    """Fraction of variance unexplained on ``x``: sum |x - x_hat|^2 / sum |x - mean(x)|^2."""
    x64 = np.asarray(x, np.float64)
    xh, _ = reconstruct(weights, x, k)
    return float(np.square(x64 - xh).sum() / np.square(x64 - x64.mean(axis=0)).sum())


def _normalize(weights: dict, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if "mean" in weights:
        x = x - np.asarray(weights["mean"], np.float32)
    if "scale" in weights:
        x = x / np.asarray(weights["scale"], np.float32)
    return x


__all__ = ["PlantedDictionary", "best_cosines", "encode", "fvu", "mmcs", "reconstruct", "recovered"]
