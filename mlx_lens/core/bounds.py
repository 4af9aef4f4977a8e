"""Error bounds of the lens's fp32 arithmetic: every tolerance in the tests and in
`mlx-lens parity` comes from here. The derivations are in docs/numerics.md; each function names
its section there. All inputs and results are float64 numpy; bounds are in nats unless a name
says otherwise, and first order in the unit roundoff u unless stated.
"""
from __future__ import annotations

import math

import numpy as np

UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
U32 = UNIT_ROUNDOFF["float32"]
# Terms per level of every blocked sum over the vocabulary (both backends' reductions).
SUM_BLOCK = 64
# Relative error of the exp/exp2 kernels, in units of u, for an argument x <= 0 (nats):
# EXP_ULPS + EXP_SLOPE * |x|. The slope covers the fp32 rounding of the argument (z - m, and a
# kernel's own x * log2(e)); measured on mlx-cpu 0.32: 1.13 (4 + |x|) u, torch: 1.2 u (§2).
EXP_ULPS, EXP_SLOPE = 4.0, 2.0


def gamma(n: int | np.ndarray, u: float = U32) -> float | np.ndarray:
    """Higham's gamma_n = n u / (1 - n u): the worst-case relative error of any n-term sum or
    length-n dot product in unit roundoff u, whatever the order of the additions (§1)."""
    return n * u / (1 - n * u)


def summation_depth(vocab: int, widest_chunk: int) -> int:
    """Roundings a term of a blocked running sum over `vocab` tokens can go through, when the
    vocabulary is consumed in chunks of at most `widest_chunk` (§2): SUM_BLOCK per level of
    the blocked sum, and per merge of a chunk into the running sum two roundings plus the rescale
    factor's own exp error (EXP_ULPS)."""
    levels, n = 1, widest_chunk
    while n > SUM_BLOCK:
        n, levels = -(-n // SUM_BLOCK), levels + 1
    merges = -(-vocab // widest_chunk) - 1
    return SUM_BLOCK * levels + (2 + int(EXP_ULPS)) * merges


def _softmax_parts(z: np.ndarray):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    x = z - m  # <= 0
    s = np.exp(x).sum(-1, keepdims=True)
    logp = x - np.log(s)
    return m, x, s, logp, np.exp(logp)


def reduction_bounds(z: np.ndarray, depth: int, u: float = U32) -> dict[str, np.ndarray]:
    """How far a blocked running reduction of depth `depth` (fp32) can be from float64 on the
    same logits z [..., V] (§2). Returns per row: `entropy` (nats), `log_s` (the relative
    error of S = sum e^(z-m), i.e. the error of logsumexp), `logp` [..., V] (the error of each
    log-probability) and `lse`."""
    m, x, s, logp, p = _softmax_parts(z)
    g = gamma(depth, u)
    ax = -x
    mu1 = (p * ax).sum(-1)
    mu2 = (p * ax * ax).sum(-1)
    lse = (m + np.log(s))[..., 0]
    entropy = -(p * logp).sum(-1)
    eps_s = g + u * (EXP_ULPS + EXP_SLOPE * mu1)  # E_p of each term's exp error, plus the sum's
    eps_a = g * mu1 + u * ((EXP_ULPS + 1) * mu1 + EXP_SLOPE * mu2)
    final_ops = 2 * u * (np.log(s[..., 0]) + mu1 + entropy)  # log, division, subtraction
    logp_err = eps_s[..., None] + u * (EXP_ULPS + EXP_SLOPE * np.abs(logp) + np.abs(lse)[..., None])
    return {"entropy": eps_s + eps_a + mu1 * eps_s + final_ops, "log_s": eps_s,
            "logp": logp_err, "lse": lse}


def kl_reduction_bound(z: np.ndarray, z_final: np.ndarray, depth: int,
                       u: float = U32) -> np.ndarray:
    """Error of KL(P || P_final) in nats from the reductions (§2): rows z [R, V] against the
    final row z_final [V], with D = sum e^(z-m) (z_f - z) summed like S."""
    m, x, s, _, p = _softmax_parts(z)
    m_f, x_f, s_f, _, p_f = _softmax_parts(np.asarray(z_final)[None])
    lse, lse_f = (m + np.log(s))[..., 0], (m_f + np.log(s_f))[..., 0]
    gap = np.abs(np.asarray(z_final, np.float64)[None] - z)
    return kl_bound_from_sums(depth, (p * -x).sum(-1), (p_f * -x_f).sum(-1), (p * gap).sum(-1),
                              (p * gap * -x).sum(-1), lse, lse_f, u)


def kl_bound_from_sums(depth: int, mu1, mu1_f, gap, gap_x, lse, lse_f, u: float = U32):
    """`kl_reduction_bound` from the expectations a running reduction accumulates (§2), in
    nats: mu1 = E_p[m - z] (-A/S) of the row and of the final row, gap = E_p|z_f - z|,
    gap_x = E_p[|z_f - z| (m - z)], and the two logsumexps. Plain arithmetic only, so that a
    reducer evaluates it on its own arrays (numpy, torch, mlx)."""
    g = gamma(depth, u)
    log_s, log_s_f = (g + u * (EXP_ULPS + EXP_SLOPE * mu) for mu in (mu1, mu1_f))
    d_err = g * gap + u * ((EXP_ULPS + 1) * gap + EXP_SLOPE * gap_x)
    return log_s + log_s_f + d_err + 2 * u * (gap + abs(lse) + abs(lse_f))


def pair_reduction_bounds(za: np.ndarray, zb: np.ndarray, depth: int,
                          u: float = U32) -> dict[str, np.ndarray]:
    """Error in nats of the lens-pair reductions (§6) on rows of fp32 logits za, zb [N, V] (two
    lenses' decodes of the same rows): `kl_ab` = KL(P_a || P_b), `kl_ba`, `js`. Each log p is
    formed as z - lse from the first pass's logsumexp, each sum blocked at depth `depth`."""
    g = gamma(depth, u)
    parts = []
    for z in (za, zb):
        m, x, s, logp, p = _softmax_parts(z)
        lse = (m + np.log(s))[..., 0]
        log_s = g + u * (EXP_ULPS + EXP_SLOPE * (p * -x).sum(-1))  # of S, as in §2
        parts.append((logp, p, log_s + u * (2 * np.abs(np.log(s[..., 0])) + np.abs(lse))))
    (la, pa, ea), (lb, pb, eb) = parts
    vocab = za.shape[-1]

    def kl(lp, p, e, lq, f):
        d = np.abs(lp - lq)
        return ((g + (2 + EXP_ULPS) * u + e) * (p * d).sum(-1)
                + EXP_SLOPE * u * (p * np.abs(lp) * d).sum(-1) + e + f
                + u * (p * (np.abs(lp) + np.abs(lq))).sum(-1) + vocab * FP32_TINY * d.max(-1))

    mix = np.logaddexp(la, lb) - math.log(2)
    d_mix = ((ea + eb)[..., None] + u * (np.abs(la) + np.abs(lb))
             + u * (EXP_ULPS + EXP_SLOPE + 4 + 2 * np.abs(mix)))
    js = 0.0
    for lp, p, e in ((la, pa, ea), (lb, pb, eb)):
        t = np.abs(lp - mix)
        d_t = e[..., None] + u * np.abs(lp) + d_mix + u * t
        js = js + 0.5 * ((g + (3 + EXP_ULPS) * u + e) * (p * t).sum(-1)
                         + EXP_SLOPE * u * (p * np.abs(lp) * t).sum(-1) + (p * d_t).sum(-1)
                         + vocab * FP32_TINY * t.max(-1))
    return {"kl_ab": kl(la, pa, ea, lb, eb), "kl_ba": kl(lb, pb, eb, la, ea), "js": js}


def js_shift_bound(b_a: np.ndarray, b_b: np.ndarray) -> np.ndarray:
    """Change of the Jensen-Shannon divergence in nats when P_a's logits move by at most b_a
    and P_b's by at most b_b [..., V] (§6): (1 + ln 2) (max b_a + max b_b), uniformly."""
    return (1 + math.log(2)) * (np.max(b_a, -1) + np.max(b_b, -1))


# Length-d products' worth of rounding between a captured row and its fp32 logits (§1): the
# lens norm's mean square (gamma_d) and its few scalings (4u <= gamma_d for d >= 4), the GEMM.
DECODE_PRODUCTS = 3


def lead_bound(x_norm: np.ndarray, w_max: float, d: int, softcap: float | None,
               u: float = U32) -> np.ndarray:
    """|error| in bits of a lead z_a - z_b (two logits of one decoded row of norm x_norm) from
    the lens's own fp32 decode (§5): each logit within DECODE_PRODUCTS gamma_d |x| |w| of exact
    arithmetic, |w| <= w_max (the head's largest row norm), plus its element-wise roundings
    with |z| <= |x| w_max; the logsumexp cancels in a lead."""
    z = np.asarray(x_norm, np.float64) * w_max
    per_logit = DECODE_PRODUCTS * gamma(d, u) * z + elementwise_bound(z, softcap, u)
    return nats_to_bits(2 * per_logit)


def framework_logit_bound(x_norm: np.ndarray, w_norm: np.ndarray, d: int, logits: np.ndarray,
                          softcap: float | None, compute: str) -> np.ndarray:
    """[..., V] |error| in nats of the framework's own output logits (its norm and head in the
    compute dtype) against the lens's fp32 decode of the same final residual (§4, reduced
    precision): the framework rounds its final norm's output to the dtype (the weight multiply
    too: 2 u_c of the normalised state, a length-1 "dot product" each) and its logits (u_c |z|,
    the soft-cap in the dtype: elementwise_bound at u_c); both GEMMs accumulate in fp32 (one
    length-d product each). In fp32, u_c = u."""
    uc = UNIT_ROUNDOFF.get(compute, U32)
    return (dot_bound(x_norm, w_norm, 1, 2, uc) + dot_bound(x_norm, w_norm, d, 2)
            + elementwise_bound(logits, softcap, uc))


def head_path_refusal(name: str, lens: np.ndarray, own: np.ndarray, x_norm: float,
                      w_norm: np.ndarray, d: int, softcap: float | None,
                      compute: str) -> str | None:
    """Why a model is refused, or None: the lens's decode of the model's own final-norm input
    (fp32) against the model's own output logits [V] beyond framework_logit_bound means the
    lens does not apply the model's head path (a logit scale, a transform after the head)."""
    if not (np.isfinite(x_norm) and np.all(np.isfinite(own))):
        return None  # a model whose output is not finite: the run's health check reports it
    bound = framework_logit_bound(np.array(x_norm), w_norm, d, own, softcap, compute)
    gap = np.abs(np.asarray(lens, np.float64) - own)
    if np.all(gap <= bound):
        return None
    return (f"{name}: the lens's decode of the model's last state differs from the model's own "
            f"logits by up to {gap.max():.3g} ({over_bound(gap, bound).max():.3g}x the derived "
            "bound): its head path is not one the lens reads")


def dot_bound(x_norm: np.ndarray, w_norm: np.ndarray, d: int, products: float,
              u: float = U32) -> np.ndarray:
    """|error| of logits x . w_i for `products` length-d fp32 dot products' worth of rounding:
    products * gamma_d * |x| |w_i| (Cauchy-Schwarz on sum_j |x_j w_ij|), [..., V] (§1)."""
    return products * gamma(d, u) * np.asarray(x_norm, np.float64)[..., None] * w_norm


def translated_products(h: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                        u: float = U32) -> np.ndarray:
    """[R, T]: the parity model's length-d products (§4) for rows decoded through a tuned lens's
    translators y = h + A h + b (rows past the translators: r + 1 as without one). A residual
    within r products (relative r gamma_d) reaches y amplified by |I + A|_2 |h| / |y|; computing
    y adds gamma_{d+2} (|h| + |A||h| + |b|) per component, i.e. that vector's norm over |y| in
    units of gamma_d; then one product for the decode."""
    h = np.asarray(h, np.float64)
    rows, d = len(h), h.shape[-1]
    out = np.broadcast_to((np.arange(rows) + 1.0)[:, None], h.shape[:2]).copy()
    for r in range(min(len(weight), rows)):
        a, b, x = weight[r].astype(np.float64), bias[r].astype(np.float64), h[r]
        y = np.linalg.norm(x + x @ a.T + b, axis=-1)
        spread = np.linalg.norm(np.abs(x) + np.abs(x) @ np.abs(a).T + np.abs(b), axis=-1)
        amplify = np.linalg.norm(np.eye(d) + a, 2) * np.linalg.norm(x, axis=-1)
        out[r] = (r * amplify + spread * gamma(d + 2, u) / gamma(d, u)) / y + 1
    return out


def elementwise_bound(z: np.ndarray, softcap: float | None, u: float = U32) -> np.ndarray:
    """Roundings after the GEMM (§1): bias, the soft-cap's division and a base change, u |z|
    each; tanh (<= 4 ulp; measured 2.7 on mlx-cpu, 1 on torch) and the cap's multiplication,
    5 u cap. One u spare on each."""
    return 4 * u * np.abs(z) + 6 * u * (softcap or 0.0)


def logit_shift_bounds(logp: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """What a logit perturbation |delta_i| <= b_i [..., V] can do to a distribution with
    log-probabilities logp (§3), per row: `entropy` (nats: first order through the varentropy,
    Cauchy-Schwarz, plus the second-order term), `logp` (max |change| of any log-probability),
    `kl` (KL between the two distributions, Hoeffding's lemma: range^2 / 8)."""
    p = np.exp(logp)
    h = -(p * logp).sum(-1, keepdims=True)
    varentropy = (p * (logp + h) ** 2).sum(-1)
    b_max = b.max(-1)
    first = np.sqrt(varentropy * (p * b * b).sum(-1))
    return {"entropy": first + 2 * (1 + np.sqrt(varentropy)) * b_max**2,
            "logp": 2 * b_max, "kl": b_max**2 / 2}


def kl_shift_bound(logp: np.ndarray, logq: np.ndarray, b: np.ndarray,
                   b_final: np.ndarray) -> np.ndarray:
    """Change of KL(P || Q) in nats when P's logits move by at most b [R, V] and Q's by b_final
    [V] (§3): Cov_P(delta, log P/Q) through Cauchy-Schwarz, plus the change of log Q."""
    p = np.exp(logp)
    ratio = logp - logq
    sd = np.sqrt((p * (ratio - (p * ratio).sum(-1, keepdims=True)) ** 2).sum(-1))
    return np.sqrt((p * b * b).sum(-1)) * sd + 2 * b_final.max() + 4 * b.max(-1) ** 2


# The smallest normal fp32: a probability below it may be flushed to zero (or lose its bits).
FP32_TINY = float(np.finfo(np.float32).tiny)


def probability_bound(p: np.ndarray, log_err: np.ndarray) -> np.ndarray:
    """|change| of a probability p whose log moves by at most log_err, computed in fp32."""
    return p * np.expm1(log_err) + FP32_TINY


def sweep_tolerances(z: np.ndarray, b: np.ndarray, depth: int,
                     u: float = U32) -> dict[str, np.ndarray]:
    """How far a sweep's statistics may be from the float64 statistics of logits z [R, T, V]
    (fp32 values) when the sweep's own logits differ from z by at most b [R, T, V] and its
    vocabulary sums have the given depth (§2 + §3). Entropy and KL in bits; `prob` [R, T, V]
    bounds each token's probability, `cos` [R] the cosine to the final row (all at the last
    position for KL and cosine)."""
    z = np.asarray(z, np.float64)
    _, _, _, logp, p = _softmax_parts(z)
    red = reduction_bounds(z, depth, u)
    shift = logit_shift_bounds(logp, b)
    b_max = b.max(-1, keepdims=True)
    last, b_last = z[:, -1], b[:, -1]
    kl = (kl_reduction_bound(last, last[-1], depth, u)
          + kl_shift_bound(logp[:, -1], logp[-1, -1], b_last, b_last[-1]))
    norm_b, norm_z = np.linalg.norm(b_last, axis=-1), np.linalg.norm(last, axis=-1)
    cos = 2 * (norm_b / norm_z + norm_b[-1] / norm_z[-1]) + 2 * gamma(depth, u) + 4 * u
    return {"entropy": nats_to_bits(red["entropy"] + shift["entropy"]),
            "prob": probability_bound(p, red["logp"] + b + b_max),
            "kl": nats_to_bits(kl), "cos": cos}


def may_swap(z: np.ndarray, b: np.ndarray, token: np.ndarray) -> np.ndarray:
    """[..., V]: which tokens' logits are within the perturbation bounds b of `token`'s [...],
    so that a perturbed computation may order them either way (the token itself excluded)."""
    zt = np.take_along_axis(z, token[..., None], -1)
    bt = np.take_along_axis(b, token[..., None], -1)
    close = np.abs(np.asarray(z, np.float64) - zt) <= b + bt
    np.put_along_axis(close, token[..., None], False, -1)
    return close


def over_bound(err: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """|err| / bound elementwise, where above 1 fails: a zero bound admits exact agreement only
    (0 / 0 is 0: a head row of zeros gives every backend an exact logit of 0; anything else
    over 0 is inf), and a NaN (a non-finite value, no comparison made) is inf, never a pass."""
    err, bound = np.abs(np.asarray(err, np.float64)), np.asarray(bound, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        use = np.where(err == 0, 0.0, err / bound)
    return np.where(np.isnan(use), np.inf, use)


def nats_to_bits(x):
    return x / math.log(2)
