"""Per-step Newton–Schulz coefficients that are minimax-optimal (the Polar Express schedule).

Muon's Newton–Schulz step maps every singular value s of X by an odd quintic p(s) = a s + b s^3 + c s^5
(X <- a X + (b A + c A^2) X, A = X X^T). The classic schedule repeats one triple (3.4445, -4.7750,
2.0315) and leaves the singular values in roughly [0.7, 1.2]. Amsel, Persson, Musco and Gower
(2025, "The Polar Express", arXiv:2505.16932) choose each step's quintic as the best uniform
approximation of 1 on the interval [lo, hi] that the singular values occupy at that step, then
follow the interval through p: after a few steps it is narrower than the fixed triple's band, with
the same cost per step. This module computes such a schedule; nothing here touches tensors.

    polar_express_coefficients(steps)  ->  ((a1, b1, c1), ..., (a_steps, b_steps, c_steps))

Schedule (all numbers are singular values of the normalized X, so hi starts at 1):
  * lo starts at `lowest` (singular values below it still grow, only more slowly);
  * each step fits p on [max(lo, cushion * hi), hi]: the cushion keeps the first steps from aiming
    at tiny singular values with a steep, noise-amplifying slope;
  * every step but the last is stretched by `safety` (p(s / safety)), so values that bf16 rounding
    pushes a little above hi still map into the band;
  * the interval then moves to [p(lo), max p] for the next step.
"""
from __future__ import annotations

import functools
import math

import torch

LOWEST = 1e-3  # smallest singular value (of X / ||X||_F) the schedule aims at
CUSHION = 0.02  # a step never fits p below this fraction of the interval's top
SAFETY = 1.01  # headroom for bf16 rounding above the interval's top


def _quintic(a: float, b: float, c: float, s: float) -> float:
    return a * s + b * s**3 + c * s**5


def optimal_quintic(lo: float, hi: float, tol: float = 1e-15, max_iter: int = 100) -> tuple[float, float, float, float]:
    """(a, b, c, err): the odd quintic that best approximates 1 on [lo, hi] in the max norm.

    Remez exchange: the optimum equioscillates at lo < q < r < hi, with p = 1 - err at lo and r and
    p = 1 + err at q and hi, where q, r are p's interior critical points. Solve the 4 x 4 linear system
    for (a, b, c, err) at the current points, move q, r to the roots of p' (a quadratic in s^2),
    repeat until err settles. For lo ~ hi the answer is the classic Newton–Schulz quintic scaled
    to hi: p(s) = (15 t - 10 t^3 + 3 t^5) / 8 with t = s / hi.
    """
    if not 0 < lo <= hi:
        raise ValueError(f"optimal_quintic needs 0 < lo <= hi, got lo = {lo}, hi = {hi}")
    if lo / hi > 1 - 5e-6:
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5, 0.0
    q, r = (3 * lo + hi) / 4, (lo + 3 * hi) / 4
    err_old = math.inf
    for _ in range(max_iter):
        points, signs = (lo, q, r, hi), (1.0, -1.0, 1.0, -1.0)  # p(s) + sign * err = 1
        system = torch.tensor([[s, s**3, s**5, sign] for s, sign in zip(points, signs)], dtype=torch.float64)
        a, b, c, err = torch.linalg.solve(system, torch.ones(4, dtype=torch.float64)).tolist()
        disc = 9 * b * b - 20 * a * c  # p'(s) = a + 3 b y + 5 c y^2 with y = s^2
        if disc <= 0 or c == 0:
            break
        y1, y2 = sorted(((-3 * b - math.sqrt(disc)) / (10 * c), (-3 * b + math.sqrt(disc)) / (10 * c)))
        if y1 <= 0:
            break
        q, r = math.sqrt(y1), math.sqrt(y2)
        if abs(err - err_old) < tol:
            break
        err_old = err
    return a, b, c, abs(err)


@functools.lru_cache(maxsize=None)
def polar_express_coefficients(steps: int, lowest: float = LOWEST, cushion: float = CUSHION,
                               safety: float = SAFETY) -> tuple[tuple[float, float, float], ...]:
    """One (a, b, c) per Newton–Schulz step (see the module docstring for the schedule)."""
    if steps < 1:
        raise ValueError(f"polar_express_coefficients needs steps >= 1, got {steps}")
    lo, hi = lowest, 1.0
    out = []
    for step in range(steps):
        a, b, c, err = optimal_quintic(max(lo, cushion * hi), hi)
        if step < steps - 1:  # p(s / safety): the same map, stretched a little beyond hi
            a, b, c = a / safety, b / safety**3, c / safety**5
        out.append((a, b, c))
        lo, hi = _quintic(a, b, c, lo), 1 + err
    return tuple(out)
