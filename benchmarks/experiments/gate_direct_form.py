"""Two ways of forming a decay's gradient in the backward, compared in fp32 against float64 autograd through
the step-by-step recurrence: the additive chunk form with a vector decay, one head.

The per-step log-decay gradient dg_t (t in chunk c, local cumulative log-decay G, pairs P_ij = q_i k_j E[G_i - G_j]
(do_i . v_j) per channel, h_c the state entering the chunk, dh_{c+1} the gradient of the state leaving it):

    dg_t = sum_{i >= t > j} P_ij + sum_{i >= t} X_i + sum_{j < t} Y_j + Z_c
    X_i = q_i E[G_i] (h_c do_i),  Y_j = k_j E[G_n - G_j] (dh_{c+1} v_j),  Z_c = E[G_n] sum_v h_c dh_{c+1}

* identity: dGpos_i = q_i dq_i - k_i dk_i (every intra pair, the diagonal included, in both), a reverse running
  sum over the whole sequence, plus dfinal = sum_v h_T dht;
* direct: the same per position but with strict intra pairs (the diagonal P_ii is in both q dq and k dk and
  cancels exactly only if left out of both), a reverse running sum inside the chunk only, plus the chunk's
  gate carry sum_j Y_j + Z_c formed from the states.

The kernels and the PyTorch twin use the direct form (docs/chunk_math.md, "Backward"). Prints, per case, the
largest error of each form per step and summed over steps and channels (what a per-head decay's gradient is),
relative to max(|truth|, 1e-2), over 3 seeds:

    python -m benchmarks.experiments.gate_direct_form
"""

import torch


def _rev_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(torch.cumsum(torch.flip(x, [0]), 0), [0])


def _truth(q, k, v, gl, h0, do, dht) -> torch.Tensor:
    """dL/dg (float64, autograd through the step-by-step recurrence; o_t reads the state after step t)."""
    glr = gl.clone().requires_grad_()
    S, outs = h0.clone(), []
    for t in range(q.shape[0]):
        S = torch.exp(glr[t])[:, None] * S + k[t][:, None] * v[t][None, :]
        outs.append(S.T @ q[t])
    ((torch.stack(outs) * do).sum() + (S * dht).sum()).backward()
    return glr.grad


def run(T: int, K: int, V: int, BT: int, lo: float, seed: int, h0_on: bool = True) -> tuple[float, ...]:
    """Errors of (identity per step, direct per step, identity summed, direct summed) against float64."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = rnd(T, K), rnd(T, K) / K ** 0.5, rnd(T, V)
    gl = torch.rand(T, K, generator=gen, dtype=torch.float64) * lo     # per-step log-decays in [lo, 0]
    h0 = rnd(K, V) if h0_on else torch.zeros(K, V, dtype=torch.float64)
    do, dht = rnd(T, V), rnd(K, V)
    truth = _truth(q, k, v, gl, h0, do, dht)
    q, k, v, g, do, dht = (x.float() for x in (q, k, v, gl, do, dht))
    spans = [slice(c, min(T, c + BT)) for c in range(0, T, BT)]
    Gs = [torch.cumsum(g[sl], 0) for sl in spans]
    hs = [h0.float()]                                        # the state entering each chunk, then the final one
    for sl, G in zip(spans, Gs):
        hs.append(torch.exp(G[-1])[:, None] * hs[-1] + (k[sl] * torch.exp(G[-1][None] - G)).T @ v[sl])
    dh = [dht] * (len(spans) + 1)                            # the gradient of the state leaving chunk c: dh[c + 1]
    for c in range(len(spans) - 1, -1, -1):
        sl, G = spans[c], Gs[c]
        dh[c] = torch.exp(G[-1])[:, None] * dh[c + 1] + (q[sl] * torch.exp(G)).T @ do[sl]
    ident, direct = [], []
    for c, (sl, G) in enumerate(zip(spans, Gs)):
        n = G.shape[0]
        qd, kd = q[sl] * torch.exp(G), k[sl] * torch.exp(-G)
        A = do[sl] @ v[sl].T                                 # A_ij = do_i . v_j
        incl = torch.tril(torch.ones(n, n, dtype=torch.bool))
        strict = torch.tril(incl, -1)
        X = qd * (hs[c] @ do[sl].T).T
        Y = k[sl] * torch.exp(G[-1][None] - G) * (dh[c + 1] @ v[sl].T).T

        def qk_terms(mask):
            Am = torch.where(mask, A, 0.0)
            return q[sl] * torch.exp(G) * (Am @ kd) - k[sl] * torch.exp(-G) * (Am.T @ qd)

        ident.append(qk_terms(incl) + X - Y)
        Z = torch.exp(G[-1]) * (hs[c] * dh[c + 1]).sum(-1)
        direct.append(_rev_cumsum(qk_terms(strict) + X - Y) + (Y.sum(0) + Z)[None])
    dg_ident = _rev_cumsum(torch.cat(ident)) + (hs[-1] * dht).sum(-1)[None]
    dg_direct = torch.cat(direct)
    sc, tot = truth.abs().max().clamp_min(1e-2), truth.sum()
    return (float((dg_ident.double() - truth).abs().max() / sc), float((dg_direct.double() - truth).abs().max() / sc),
            float((dg_ident.double().sum() - tot).abs() / tot.abs().clamp_min(1e-2)),
            float((dg_direct.double().sum() - tot).abs() / tot.abs().clamp_min(1e-2)))


def main() -> None:
    for T, K, V, BT, lo, h0_on in ((1, 16, 16, 16, -3.0, False), (1, 16, 16, 16, -3.0, True),
                                   (260, 64, 64, 64, -0.05, True), (260, 64, 64, 64, -0.5, True),
                                   (1000, 32, 32, 64, -0.02, True), (4096, 32, 32, 64, -0.01, True)):
        r = [run(T, K, V, BT, lo, s, h0_on) for s in range(3)]
        print(f"T={T} K={K} lo={lo} initial state {h0_on}: per step, identity {max(x[0] for x in r):.1e} direct "
              f"{max(x[1] for x in r):.1e}; summed (a per-head decay) identity {max(x[2] for x in r):.1e} direct "
              f"{max(x[3] for x in r):.1e}")


if __name__ == "__main__":
    main()
