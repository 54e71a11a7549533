"""Compiled (numba) kernels of the CBO solvers.

Every kernel works on the *reduced* problem over the free variables (forced blocks folded in):

    E(T) = sum_{j in T} u[j] + sum_{j != k in T} W[j, k],      |T| = m,

with `W` (n, n) symmetric with a zero diagonal and `u` (n,) the unary costs (H_jj + c_j + coupling
to forced-removed blocks). States are bit masks: `uint64` arrays of `ceil(n / 64)` words, bit j of
word j // 64 set when free variable j is removed.

The K best states found so far live in a "top-K" store: energies `topE` (K,), masks `topM`
(K, words) and `ts` (2,) int64 = [count, index of the worst entry]. Order is (energy, lexicographic
order of the sorted removed indices), which for equal-size sets is "the set owning the lowest
differing index comes first".
"""

from __future__ import annotations

import os

import numba as nb
import numpy as np

from cboprune.core.outputs import cache_dir

# numba keeps its compiled kernels (and index files it unpickles) next to the source by default:
# in site-packages, unwritable on a read-only install, where every process compiled again (28 s).
# They go under cboprune's cache directory instead, set before the first kernel is decorated.
if not os.environ.get("NUMBA_CACHE_DIR"):
    nb.config.CACHE_DIR = str(cache_dir() / "numba")

_JIT = {"cache": True, "nogil": True}

ONE = np.uint64(1)
ZERO = np.uint64(0)


# ----------------------------------------------------------------------------------------------
# bit masks and the top-K store
# ----------------------------------------------------------------------------------------------


@nb.njit(**_JIT)
def set_bit(mask, j):
    mask[j >> 6] |= ONE << np.uint64(j & 63)


@nb.njit(**_JIT)
def clear_bit(mask, j):
    mask[j >> 6] &= ~(ONE << np.uint64(j & 63))


@nb.njit(**_JIT)
def lex_less(a, b):
    """True if set `a` precedes set `b` (equal sizes) in lexicographic order of sorted indices."""
    for w in range(a.shape[0]):
        x = a[w] ^ b[w]
        if x != ZERO:
            low = x & (~x + ONE)
            return (a[w] & low) != ZERO
    return False


@nb.njit(**_JIT)
def masks_equal(a, b):
    for w in range(a.shape[0]):
        if a[w] != b[w]:
            return False
    return True


@nb.njit(**_JIT)
def _worse(e1, m1, e2, m2):
    """True if entry 1 ranks after entry 2."""
    if e1 > e2:
        return True
    if e1 < e2:
        return False
    return lex_less(m2, m1)


@nb.njit(**_JIT)
def _recompute_worst(topE, topM, ts):
    cnt = ts[0]
    w = 0
    for i in range(1, cnt):
        if _worse(topE[i], topM[i], topE[w], topM[w]):
            w = i
    ts[1] = w


@nb.njit(**_JIT)
def topk_cutoff(topE, ts, seed_cutoff):
    """Energy a new state must not exceed to enter the store (inf while it is not full)."""
    if ts[0] < topE.shape[0]:
        return seed_cutoff
    c = topE[ts[1]]
    return c if c < seed_cutoff else seed_cutoff


@nb.njit(**_JIT)
def topk_insert(topE, topM, ts, e, mask, dedupe):
    """Offer a state; keeps the K best by (energy, lex). Returns True if it was stored."""
    k = topE.shape[0]
    cnt = ts[0]
    if dedupe:
        for i in range(cnt):
            if masks_equal(topM[i], mask):
                return False
    if cnt < k:
        topE[cnt] = e
        topM[cnt, :] = mask
        ts[0] = cnt + 1
        if cnt + 1 == k:
            _recompute_worst(topE, topM, ts)
        return True
    w = ts[1]
    if _worse(topE[w], topM[w], e, mask):
        topE[w] = e
        topM[w, :] = mask
        _recompute_worst(topE, topM, ts)
        return True
    return False


# ----------------------------------------------------------------------------------------------
# reference: exhaustive enumeration in revolving-door (Gray code) order
# ----------------------------------------------------------------------------------------------


@nb.njit(**_JIT)
def enumerate_kbest(W, u, m, topE, topM, ts, max_states):
    """Visit all C(n, m) states (or the first `max_states` if > 0) in revolving-door order.

    Each step swaps one block in and one out (Knuth, TAOCP 7.2.1.3, Algorithm R), so the energy is
    updated in O(1) from g = W x and g in O(n). Returns the number of states visited.
    """
    n = u.shape[0]
    words = topM.shape[1]
    mask = np.zeros(words, np.uint64)
    if m == 0:
        topk_insert(topE, topM, ts, 0.0, mask, False)
        return 1
    if m == 1:
        for j in range(n):
            mask[:] = ZERO
            set_bit(mask, j)
            topk_insert(topE, topM, ts, u[j], mask, False)
        return n
    if m == n:
        e = 0.0
        for j in range(n):
            set_bit(mask, j)
            e += u[j]
            for k in range(j + 1, n):
                e += 2.0 * W[j, k]
        topk_insert(topE, topM, ts, e, mask, False)
        return 1
    t = m
    c = np.empty(t + 2, np.int64)  # 1-based: c[1..t], c[t+1] = n (sentinel)
    for j in range(1, t + 1):
        c[j] = j - 1
    c[t + 1] = n
    g = np.zeros(n)
    e = 0.0
    for j in range(t):
        set_bit(mask, j)
        e += u[j] + 2.0 * g[j]
        for i in range(n):
            g[i] += W[j, i]
    topk_insert(topE, topM, ts, e, mask, False)
    count = 1
    odd = (t & 1) == 1
    while True:
        if max_states > 0 and count >= max_states:
            return count
        out = -1
        inn = -1
        j = 2
        goto_r4 = False
        # R3
        if odd:
            if c[1] + 1 < c[2]:
                out = c[1]
                inn = c[1] + 1
                c[1] += 1
            else:
                j = 2
                goto_r4 = True
        else:
            if c[1] > 0:
                out = c[1]
                inn = c[1] - 1
                c[1] -= 1
            else:
                j = 2
                goto_r4 = False
        if out < 0:
            done = False
            while True:
                if goto_r4:
                    # R4: c[j] == c[j-1] + 1; try to decrease c[j]
                    if c[j] >= j:
                        out = c[j]
                        inn = j - 2
                        c[j] = c[j - 1]
                        c[j - 1] = j - 2
                        break
                    j += 1
                # R5: c[j-1] == j - 2; try to increase c[j]
                if c[j] + 1 < c[j + 1]:
                    out = j - 2
                    inn = c[j] + 1
                    c[j - 1] = c[j]
                    c[j] += 1
                    break
                j += 1
                if j > t:
                    done = True
                    break
                goto_r4 = True
            if done:
                return count
        e += u[inn] - u[out] + 2.0 * (g[inn] - g[out]) - 2.0 * W[inn, out]
        for i in range(n):
            g[i] += W[inn, i] - W[out, i]
        clear_bit(mask, out)
        set_bit(mask, inn)
        count += 1
        if ts[0] < topE.shape[0] or e <= topE[ts[1]]:
            topk_insert(topE, topM, ts, e, mask, False)
    return count


# ----------------------------------------------------------------------------------------------
# tabu search with swap moves (also records every low neighbour: a K-best seeder)
# ----------------------------------------------------------------------------------------------


@nb.njit(**_JIT)
def _state_energy(W, u, x):
    n = u.shape[0]
    e = 0.0
    for j in range(n):
        if x[j]:
            e += u[j]
            for k in range(j + 1, n):
                if x[k]:
                    e += 2.0 * W[j, k]
    return e


@nb.njit(**_JIT)
def _split_in_out(x, ins, outs, where):
    """List the removed (ins) and kept (outs) blocks of x; where[j] = j's position in its list."""
    a = 0
    b = 0
    for j in range(x.shape[0]):
        if x[j]:
            ins[a] = j
            where[j] = a
            a += 1
        else:
            outs[b] = j
            where[j] = b
            b += 1


@nb.njit(**_JIT)
def tabu_kbest(W, u, m, x0, n_iter, tenure, n_restarts, seed, topE, topM, ts):
    """Swap-move tabu search from `x0` (bool (n,), sum m), with perturbation restarts.

    Every state visited and every scanned neighbour below the current K-th energy is offered to
    the top-K store (deduplicated), so the store ends with K distinct low states.
    Returns the number of iterations done.
    """
    np.random.seed(seed)
    n = u.shape[0]
    words = topM.shape[1]
    if m == 0 or m == n:
        mask = np.zeros(words, np.uint64)
        for j in range(n):
            if x0[j]:
                set_bit(mask, j)
        topk_insert(topE, topM, ts, _state_energy(W, u, x0), mask, True)
        return 0
    x = x0.copy()
    ins = np.empty(m, np.int64)
    outs = np.empty(n - m, np.int64)
    where = np.empty(n, np.int64)  # position of j in ins or outs
    _split_in_out(x, ins, outs, where)
    g = np.zeros(n)
    for j in range(n):
        if x[j]:
            for i in range(n):
                g[i] += W[j, i]
    e = _state_energy(W, u, x)
    mask = np.zeros(words, np.uint64)
    for j in range(n):
        if x[j]:
            set_bit(mask, j)
    topk_insert(topE, topM, ts, e, mask, True)
    nb_mask = np.zeros(words, np.uint64)
    tabu_until = np.zeros(n, np.int64)
    best_e = e
    best_x = x.copy()
    it_total = 0
    per_restart = max(1, n_iter // (n_restarts + 1))
    for restart in range(n_restarts + 1):
        if restart > 0:
            # perturb the best state found so far by a few random swaps
            x[:] = best_x
            n_kick = 1 + np.random.randint(0, max(1, min(m, n - m) // 2 + 1))
            _split_in_out(x, ins, outs, where)
            for _ in range(n_kick):
                pi = np.random.randint(0, m)
                po = np.random.randint(0, n - m)
                i = ins[pi]
                j = outs[po]
                x[i] = False
                x[j] = True
                ins[pi] = j
                where[j] = pi
                outs[po] = i
                where[i] = po
            g[:] = 0.0
            for j in range(n):
                if x[j]:
                    for i in range(n):
                        g[i] += W[j, i]
            e = _state_energy(W, u, x)
            mask[:] = ZERO
            for j in range(n):
                if x[j]:
                    set_bit(mask, j)
            topk_insert(topE, topM, ts, e, mask, True)
            tabu_until[:] = 0
        for it in range(per_restart):
            it_total += 1
            cut = topk_cutoff(topE, ts, np.inf)
            bi = -1
            bj = -1
            bd = np.inf
            for pi in range(m):
                i = ins[pi]
                ci = u[i] + 2.0 * g[i]
                for po in range(n - m):
                    j = outs[po]
                    d = u[j] + 2.0 * g[j] - ci - 2.0 * W[i, j]
                    en = e + d
                    if en <= cut:
                        nb_mask[:] = mask
                        clear_bit(nb_mask, i)
                        set_bit(nb_mask, j)
                        if topk_insert(topE, topM, ts, en, nb_mask, True):
                            cut = topk_cutoff(topE, ts, np.inf)
                    allowed = tabu_until[i] <= it and tabu_until[j] <= it
                    if (allowed or en < best_e - 1e-12 * abs(best_e)) and d < bd:
                        bd = d
                        bi = i
                        bj = j
            if bi < 0:
                continue
            # apply swap: bi out, bj in
            e += bd
            x[bi] = False
            x[bj] = True
            pi = where[bi]
            po = where[bj]
            ins[pi] = bj
            where[bj] = pi
            outs[po] = bi
            where[bi] = po
            for r in range(n):
                g[r] += W[bj, r] - W[bi, r]
            clear_bit(mask, bi)
            set_bit(mask, bj)
            tabu_until[bi] = it + tenure + np.random.randint(0, tenure + 1)
            tabu_until[bj] = it + tenure + np.random.randint(0, tenure + 1)
            if e < best_e:
                best_e = e
                best_x[:] = x
    return it_total


# ----------------------------------------------------------------------------------------------
# parallel tempering with swap moves
# ----------------------------------------------------------------------------------------------


@nb.njit(**_JIT)
def tempering_kbest(W, u, m, temps, n_sweeps, seed, topE, topM, ts):
    """Replica-exchange Monte Carlo on the fixed-cardinality manifold (1-in/1-out moves).

    `temps` (R,) ascending temperatures. Every visited state below the K-th energy is offered to the
    top-K store (deduplicated). Returns the number of accepted moves.
    """
    np.random.seed(seed)
    n = u.shape[0]
    R = temps.shape[0]
    words = topM.shape[1]
    X = np.zeros((R, n), np.bool_)
    ins = np.empty((R, m), np.int64)
    outs = np.empty((R, n - m), np.int64)
    G = np.zeros((R, n))
    E = np.zeros(R)
    masks = np.zeros((R, words), np.uint64)
    for rep in range(R):
        perm = np.random.permutation(n)
        for a in range(m):
            X[rep, perm[a]] = True
        a = 0
        b = 0
        for j in range(n):
            if X[rep, j]:
                ins[rep, a] = j
                a += 1
                set_bit(masks[rep], j)
                for i in range(n):
                    G[rep, i] += W[j, i]
            else:
                outs[rep, b] = j
                b += 1
        E[rep] = _state_energy(W, u, X[rep])
    accepted = 0
    if m == 0 or m == n:
        topk_insert(topE, topM, ts, E[0], masks[0], True)
        return 0
    # replica slot -> temperature index mapping is kept implicit: we swap states between slots
    for sweep in range(n_sweeps):
        for rep in range(R):
            beta = 1.0 / temps[rep]
            for _ in range(n):
                pi = np.random.randint(0, m)
                po = np.random.randint(0, n - m)
                i = ins[rep, pi]
                j = outs[rep, po]
                d = u[j] + 2.0 * G[rep, j] - u[i] - 2.0 * G[rep, i] - 2.0 * W[i, j]
                if d <= 0.0 or np.random.random() < np.exp(-beta * d):
                    accepted += 1
                    E[rep] += d
                    ins[rep, pi] = j
                    outs[rep, po] = i
                    X[rep, i] = False
                    X[rep, j] = True
                    for r in range(n):
                        G[rep, r] += W[j, r] - W[i, r]
                    clear_bit(masks[rep], i)
                    set_bit(masks[rep], j)
                    if ts[0] < topE.shape[0] or E[rep] <= topE[ts[1]]:
                        topk_insert(topE, topM, ts, E[rep], masks[rep], True)
        # replica exchange between neighbouring temperatures
        start = sweep & 1
        for rep in range(start, R - 1, 2):
            delta = (1.0 / temps[rep] - 1.0 / temps[rep + 1]) * (E[rep] - E[rep + 1])
            if delta >= 0.0 or np.random.random() < np.exp(delta):
                tmp_e = E[rep]
                E[rep] = E[rep + 1]
                E[rep + 1] = tmp_e
                for q in range(n):
                    tb = X[rep, q]
                    X[rep, q] = X[rep + 1, q]
                    X[rep + 1, q] = tb
                    tg = G[rep, q]
                    G[rep, q] = G[rep + 1, q]
                    G[rep + 1, q] = tg
                for q in range(m):
                    ti = ins[rep, q]
                    ins[rep, q] = ins[rep + 1, q]
                    ins[rep + 1, q] = ti
                for q in range(n - m):
                    to = outs[rep, q]
                    outs[rep, q] = outs[rep + 1, q]
                    outs[rep + 1, q] = to
                for q in range(words):
                    tm = masks[rep, q]
                    masks[rep, q] = masks[rep + 1, q]
                    masks[rep + 1, q] = tm
    return accepted


# ----------------------------------------------------------------------------------------------
# bounds
# ----------------------------------------------------------------------------------------------


@nb.njit(**_JIT)
def build_row_table(W, order, mmax):
    """T[j, d, t] = sum of the t smallest W[j, k] over k in order[d:], k != j (t < mmax).

    Shape (n, n + 1, mmax). Entries for j not in order[d:] or t too large are +inf / unused.
    """
    n = W.shape[0]
    T = np.full((n, n + 1, max(mmax, 1)), np.inf)
    buf = np.empty(n)
    for d in range(n + 1):
        for a in range(d, n):
            j = order[a]
            cnt = 0
            for b in range(d, n):
                k = order[b]
                if k != j:
                    buf[cnt] = W[j, k]
                    cnt += 1
            s = np.sort(buf[:cnt])
            acc = 0.0
            T[j, d, 0] = 0.0
            for t in range(1, min(mmax, cnt + 1)):
                acc += s[t - 1]
                T[j, d, t] = acc
    return T


@nb.njit(**_JIT)
def _sum_smallest(vals, cnt, r, buf):
    """Sum of the r smallest of vals[:cnt] (r <= cnt)."""
    if r == 0:
        return 0.0
    for i in range(cnt):
        buf[i] = vals[i]
    s = np.sort(buf[:cnt])
    acc = 0.0
    for i in range(r):
        acc += s[i]
    return acc


@nb.njit(**_JIT)
def _project(z, F, nf, r, y):
    """y[F] = argmin ||y - z||  s.t. 0 <= y <= 1, sum y[F] = r.

    y = clip(z - tau, 0, 1) with sum r; sum(tau) is piecewise linear in tau. Bisection on tau,
    and at every step the exact root of the linear piece containing tau is tried: accepted when
    it lies in that piece's closed interval (usually after a few steps).
    """
    lo = np.inf
    hi = -np.inf
    for a in range(nf):
        v = z[F[a]]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    lo -= 1.0
    tau = 0.5 * (lo + hi)
    for _ in range(200):
        tau = 0.5 * (lo + hi)
        s = 0.0
        nfree = 0
        sfree = 0.0
        nup = 0
        L = -np.inf
        U = np.inf
        for a in range(nf):
            za = z[F[a]]
            v = za - tau
            if v >= 1.0:
                s += 1.0
                nup += 1
                if za - 1.0 < U:
                    U = za - 1.0
            elif v > 0.0:
                s += v
                nfree += 1
                sfree += za
                if za - 1.0 > L:
                    L = za - 1.0
                if za < U:
                    U = za
            elif za > L:
                L = za
        if nfree > 0:
            t2 = (sfree + nup - r) / nfree
            if L <= t2 <= U:
                tau = t2
                break
        elif s == r:
            break
        if s > r:
            lo = tau
        else:
            hi = tau
        if hi - lo <= 1e-15 * (1.0 + abs(tau)):
            break
    for a in range(nf):
        v = z[F[a]] - tau
        y[F[a]] = 1.0 if v > 1.0 else (v if v > 0.0 else 0.0)


@nb.njit(**_JIT)
def qp_bound(Q, b, F, nf, r, y, thr_hi, thr_lo, max_iter, gap_tol, lam, work):
    """Certified lower bound of the convex relaxation over the free set F (first nf entries).

        min_y  y^T (Q_FF - lam I) y + b_F^T y   s.t. 0 <= y <= 1, sum y = r

    (Q_FF - lam I PSD on 1^perp; lam is the per-depth tightening, the caller folds +lam into b).

    Projected gradient (Barzilai-Borwein step + exact line search on the projected segment) from
    the warm start y (full-length array, entries F used and updated). At every iterate y_k the
    Frank-Wolfe dual value  -y^T Q y + (sum of the r smallest entries of grad)  is a valid lower
    bound (convexity). Stops early when the bound exceeds `thr_hi` (prune) or when the primal value
    drops below `thr_lo` (the relaxation optimum is then below it: this bound can never prune), or
    when primal - bound <= gap_tol. Returns (bound, primal, iterations).
    `work` is (5, n) scratch.
    """
    Qy = work[0]
    grad = work[1]
    z = work[2]
    dvec = work[3]
    Qd = work[4]
    buf = np.empty(nf)
    vals = np.empty(nf)
    _project(y, F, nf, r, y)
    for a in range(nf):
        j = F[a]
        s = 0.0
        for c in range(nf):
            s += Q[j, F[c]] * y[F[c]]
        Qy[j] = s - lam * y[j]
    best = -np.inf
    primal = np.inf
    step = -1.0
    it = 0
    while it < max_iter:
        it += 1
        yQy = 0.0
        by = 0.0
        for a in range(nf):
            j = F[a]
            yQy += y[j] * Qy[j]
            by += b[j] * y[j]
            grad[j] = 2.0 * Qy[j] + b[j]
            vals[a] = grad[j]
        phi = yQy + by
        if phi < primal:
            primal = phi
        lb = -yQy + _sum_smallest(vals, nf, r, buf)
        if lb > best:
            best = lb
        if best > thr_hi or primal < thr_lo:
            break
        if primal - best <= gap_tol:
            break
        if step <= 0.0:
            gg = 0.0
            gQg = 0.0
            for a in range(nf):
                gg += grad[F[a]] * grad[F[a]]
            for a in range(nf):
                j = F[a]
                s = 0.0
                for c in range(nf):
                    s += Q[j, F[c]] * grad[F[c]]
                gQg += grad[j] * (s - lam * grad[j])
            step = gg / (2.0 * gQg) if gQg > 0.0 else 1.0
        for a in range(nf):
            j = F[a]
            z[j] = y[j] - step * grad[j]
        _project(z, F, nf, r, z)
        dd = 0.0
        gd = 0.0
        for a in range(nf):
            j = F[a]
            dvec[j] = z[j] - y[j]
            dd += dvec[j] * dvec[j]
            gd += grad[j] * dvec[j]
        if dd <= 1e-30 or gd >= 0.0:
            break
        dQd = 0.0
        for a in range(nf):
            j = F[a]
            s = 0.0
            for c in range(nf):
                s += Q[j, F[c]] * dvec[F[c]]
            s -= lam * dvec[j]
            Qd[j] = s
            dQd += dvec[j] * s
        alpha = 1.0
        if dQd > 0.0:
            alpha = -gd / (2.0 * dQd)
            if alpha > 1.0:
                alpha = 1.0
        for a in range(nf):
            j = F[a]
            y[j] += alpha * dvec[j]
            Qy[j] += alpha * Qd[j]
        # Barzilai-Borwein step for the next iteration (s = alpha d, Q s = alpha Qd)
        if dQd > 0.0:
            step = dd / (2.0 * dQd)
        else:
            step = step * 2.0
    return best, primal, it


# ----------------------------------------------------------------------------------------------
# K-best branch-and-bound (resumable depth-first search)
# ----------------------------------------------------------------------------------------------

# statistics slots
ST_NODES = 0
ST_LEAVES = 1
ST_PRUNE_ROW = 2
ST_PRUNE_QP = 3
ST_QP_ITERS = 4
ST_QP_CALLS = 5


@nb.njit(**_JIT)
def _leaf(W, u, order, d, r, E, g, mask, leafmask, topE, topM, ts, seed_cutoff, slack, stats):
    """Evaluate a node that needs no branching (r = 0, r = |F| or r = 1); False otherwise."""
    n = u.shape[0]
    nf = n - d
    thr = topk_cutoff(topE, ts, seed_cutoff) + slack
    if r == 0:
        stats[ST_LEAVES] += 1
        if E <= thr:
            topk_insert(topE, topM, ts, E, mask, False)
        return True
    if r == nf:
        stats[ST_LEAVES] += 1
        e = E
        leafmask[:] = mask
        for a in range(d, n):
            j = order[a]
            e += u[j] + 2.0 * g[j]
            for c in range(a + 1, n):
                e += 2.0 * W[j, order[c]]
            set_bit(leafmask, j)
        if e <= thr:
            topk_insert(topE, topM, ts, e, leafmask, False)
        return True
    if r == 1:
        for a in range(d, n):
            j = order[a]
            e = E + u[j] + 2.0 * g[j]
            stats[ST_LEAVES] += 1
            if e <= thr:
                leafmask[:] = mask
                set_bit(leafmask, j)
                if topk_insert(topE, topM, ts, e, leafmask, False):
                    thr = topk_cutoff(topE, ts, seed_cutoff) + slack
        return True
    return False


@nb.njit(**_JIT)
def _node_bound(u, Q, s_shift, lam_d, order, T, d, r, E, g, y, thr, use_row, use_qp, qp_iter,
                qp_min_free, tight, vals, buf, Fbuf, b, work, stats):
    """Lower bound of every completion of a branching node: max(row bound, relaxation bound).

    `y` (full length) is the warm start of the relaxation and receives its last iterate.
    Returns (bound, include_first): remove the next variable first when the relaxation (or the
    row bound) puts it among the likely removed ones. The bound stops early above `thr`, and
    (unless `tight`: the best-first search needs the value, not only the prune decision) as soon
    as the relaxation's primal value shows that it cannot prune.
    """
    n = u.shape[0]
    nf = n - d
    bound = -np.inf
    include_first = True
    if use_row:
        for a in range(d, n):
            j = order[a]
            vals[a - d] = u[j] + 2.0 * g[j] + T[j, d, r - 1]
        for a in range(nf):
            buf[a] = vals[a]
        srt = np.sort(buf[:nf])
        acc = 0.0
        for a in range(r):
            acc += srt[a]
        bound = E + acc
        include_first = vals[0] <= srt[r - 1]
        if bound > thr:
            stats[ST_PRUNE_ROW] += 1
            return bound, include_first
    if use_qp and nf >= qp_min_free:
        lam = lam_d[d]
        for a in range(nf):
            j = order[d + a]
            Fbuf[a] = j
            b[j] = u[j] - s_shift[j] + lam + 2.0 * g[j]
        qb, qprimal, qit = qp_bound(Q, b, Fbuf, nf, r, y, thr - E,
                                    -np.inf if tight else thr - E, qp_iter, 0.0, lam, work)
        stats[ST_QP_ITERS] += qit
        stats[ST_QP_CALLS] += 1
        if E + qb > bound:
            bound = E + qb
        if bound > thr:
            stats[ST_PRUNE_QP] += 1
        else:
            include_first = y[order[d]] >= 0.5
    return bound, include_first


@nb.njit(**_JIT)
def bnb_kbest(
    W, u, Q, s_shift, lam_d, order, T, m,
    topE, topM, ts, seed_cutoff, slack,
    use_row, use_qp, qp_iter, qp_min_free,
    stack_phase, stack_dir, stack_r, stack_E, stack_bnd, Y, g, mask, pos,
    node_budget, stats, d0,
):
    """Depth-first K-best branch-and-bound below depth d0; True when the search is complete.

    The search is resumable: `pos` = [depth], the per-depth arrays, `g` (= W x_S), `mask` and `Y`
    (warm starts of the relaxation, (n + 1, n)) carry the state between calls, so the caller can
    stop on a time or node budget and read a certified bound of the open nodes from `stack_bnd`.
    The search covers the subtree of the node at depth d0 (0: the whole tree; > 0: a dive from a
    best-first node whose state the caller put at stack depth d0); it ends with pos = d0 - 1 and
    g, mask restored to that node's state.

    Node at depth d: variables order[:d] are decided, F = order[d:] free, r = stack_r[d] still to
    remove, stack_E[d] the energy of the removed set S. A node is pruned when a lower bound of
    every completion exceeds cutoff + slack, where cutoff is the K-th best energy found (or the
    seed cutoff from the heuristic).
    Phases: 0 = new node, 1 = in first child, 2 = in second child.
    """
    n = u.shape[0]
    vals = np.empty(n)
    buf = np.empty(n)
    Fbuf = np.empty(n, np.int64)
    b = np.empty(n)
    work = np.zeros((5, n))
    leafmask = np.empty(mask.shape[0], np.uint64)
    d = pos[0]
    budget = node_budget
    while d >= d0:
        ph = stack_phase[d]
        if ph == 0:
            if budget <= 0:
                pos[0] = d
                return False
            budget -= 1
            stats[ST_NODES] += 1
            r = stack_r[d]
            E = stack_E[d]
            if _leaf(W, u, order, d, r, E, g, mask, leafmask, topE, topM, ts, seed_cutoff,
                     slack, stats):
                stack_phase[d] = 3
                d -= 1
                continue
            thr = topk_cutoff(topE, ts, seed_cutoff) + slack
            y = Y[d]
            if d > d0:
                for a in range(d, n):
                    y[order[a]] = Y[d - 1][order[a]]
            bound, include_first = _node_bound(
                u, Q, s_shift, lam_d, order, T, d, r, E, g, y, thr, use_row, use_qp, qp_iter,
                qp_min_free, False, vals, buf, Fbuf, b, work, stats)
            if bound > thr:
                stack_phase[d] = 3
                d -= 1
                continue
            stack_bnd[d] = bound
            stack_dir[d] = 1 if include_first else 0
            stack_phase[d] = 1
            # descend into the first child
            j = order[d]
            if include_first:
                stack_E[d + 1] = E + u[j] + 2.0 * g[j]
                stack_r[d + 1] = r - 1
                for i in range(n):
                    g[i] += W[j, i]
                set_bit(mask, j)
            else:
                stack_E[d + 1] = E
                stack_r[d + 1] = r
            stack_phase[d + 1] = 0
            d += 1
            continue
        elif ph == 1:
            # first child done: undo it, go into the second one (unless the bound now prunes)
            j = order[d]
            if stack_dir[d] == 1:
                for i in range(n):
                    g[i] -= W[j, i]
                clear_bit(mask, j)
            stack_phase[d] = 2
            cut = topk_cutoff(topE, ts, seed_cutoff)
            if stack_bnd[d] > cut + slack:
                stack_phase[d] = 3
                d -= 1
                continue
            E = stack_E[d]
            r = stack_r[d]
            if stack_dir[d] == 1:
                stack_E[d + 1] = E
                stack_r[d + 1] = r
            else:
                stack_E[d + 1] = E + u[j] + 2.0 * g[j]
                stack_r[d + 1] = r - 1
                for i in range(n):
                    g[i] += W[j, i]
                set_bit(mask, j)
            stack_phase[d + 1] = 0
            d += 1
            continue
        elif ph == 2:
            j = order[d]
            if stack_dir[d] == 0:
                for i in range(n):
                    g[i] -= W[j, i]
                clear_bit(mask, j)
            stack_phase[d] = 3
            d -= 1
            continue
        else:
            # phase 3: finished node (only reached on resume); go up
            d -= 1
            continue
    pos[0] = d0 - 1
    return True


@nb.njit(**_JIT)
def open_lower_bound(stack_phase, stack_bnd, pos, root_bound, d0):
    """Certified lower bound on every state in the not yet explored part of the subtree at d0.

    `root_bound` bounds the subtree's root (depth d0) itself.
    """
    d = pos[0]
    if d < d0:
        return np.inf
    lb = np.inf
    for a in range(d0, d):
        if stack_phase[a] == 1 and stack_bnd[a] < lb:
            lb = stack_bnd[a]
    if stack_phase[d] == 0:
        pb = stack_bnd[d - 1] if d > d0 else root_bound
        if pb < lb:
            lb = pb
    elif stack_phase[d] == 1 and stack_bnd[d] < lb:
        lb = stack_bnd[d]
    return lb


# ----------------------------------------------------------------------------------------------
# best-first search with depth-first dives (memory-bounded node pool)
# ----------------------------------------------------------------------------------------------

ST_BF_EXPANDED = 6
ST_DIVES = 7


@nb.njit(**_JIT)
def _heap_move(hb, hd, hr, hE, hM, hY, i, j):
    """Copy heap entry j into slot i."""
    hb[i] = hb[j]
    hd[i] = hd[j]
    hr[i] = hr[j]
    hE[i] = hE[j]
    hM[i, :] = hM[j]
    hY[i, :] = hY[j]


@nb.njit(**_JIT)
def _heap_push(hb, hd, hr, hE, hM, hY, hs, bnd, d, r, E, mask, y):
    """Push a node (bound, depth, r, energy, mask, relaxation solution) on the min-heap."""
    i = hs[0]
    hs[0] = i + 1
    while i > 0:
        par = (i - 1) >> 1
        if hb[par] <= bnd:
            break
        _heap_move(hb, hd, hr, hE, hM, hY, i, par)
        i = par
    hb[i] = bnd
    hd[i] = d
    hr[i] = r
    hE[i] = E
    hM[i, :] = mask
    for a in range(y.shape[0]):
        hY[i, a] = y[a]


@nb.njit(**_JIT)
def _heap_pop(hb, hd, hr, hE, hM, hY, hs, mask, y):
    """Pop the node of lowest bound into (mask, y). Returns (bound, depth, r, E)."""
    bnd, d, r, E = hb[0], hd[0], hr[0], hE[0]
    mask[:] = hM[0]
    for a in range(y.shape[0]):
        y[a] = hY[0, a]
    last = hs[0] - 1
    hs[0] = last
    if last == 0:
        return bnd, d, r, E
    lb = hb[last]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= last:
            break
        if c + 1 < last and hb[c + 1] < hb[c]:
            c += 1
        if hb[c] >= lb:
            break
        _heap_move(hb, hd, hr, hE, hM, hY, i, c)
        i = c
    _heap_move(hb, hd, hr, hE, hM, hY, i, last)
    return bnd, d, r, E


@nb.njit(**_JIT)
def _field_of(W, mask, g):
    """g = W x_S for the removed set S given as a bit mask."""
    n = W.shape[0]
    g[:] = 0.0
    for j in range(n):
        if (mask[j >> 6] >> np.uint64(j & 63)) & ONE:
            for i in range(n):
                g[i] += W[j, i]


@nb.njit(parallel=True, cache=True, nogil=True)
def _batch_bounds(u, Q, s_shift, lam_d, order, T, use_row, use_qp, qp_iter, qp_min_free, cnt,
                  Bd, Br, BE, BG, BY, Bthr, Bbnd, Bstats):
    """Bounds of `cnt` best-first children in parallel (one thread per child, own scratch)."""
    n = u.shape[0]
    for i in nb.prange(cnt):
        vals = np.empty(n)
        buf = np.empty(n)
        Fbuf = np.empty(n, np.int64)
        b = np.empty(n)
        work = np.zeros((5, n))
        bnd, _ = _node_bound(u, Q, s_shift, lam_d, order, T, Bd[i], Br[i], BE[i], BG[i], BY[i],
                             Bthr, use_row, use_qp, qp_iter, qp_min_free, True, vals, buf, Fbuf,
                             b, work, Bstats[i])
        Bbnd[i] = bnd


@nb.njit(**_JIT)
def bf_kbest(
    W, u, Q, s_shift, lam_d, order, T, m,
    topE, topM, ts, seed_cutoff, slack,
    use_row, use_qp, qp_iter, qp_min_free,
    hb, hd, hr, hE, hM, hY, hs, dive_free, bf_qp_iter, batch,
    stack_phase, stack_dir, stack_r, stack_E, stack_bnd, Y, g, mask, pos, dive, dive_bnd,
    node_budget, stats,
):
    """Best-first K-best branch-and-bound with depth-first dives; True when complete.

    The open nodes live in a min-heap of their bounds (capacity hb.shape[0]). Up to `batch`
    nodes of lowest bound are popped and split on the next variable of the static order; their
    children are bounded in parallel (`_batch_bounds`, relaxation warm-started from the parent's
    stored solution hY, iterated to `bf_qp_iter` steps since the value itself matters here) and
    pushed unless pruned; leaves go to the top-K store. A node with at most `dive_free` free
    variables, or any node once the pool is nearly full, is instead finished by a depth-first
    dive (`bnb_kbest` below its depth, resumable: dive = [root depth, active], dive_bnd = [its
    bound]). The certified bound of everything still open is min(heap minimum, the dive's open
    bound): it only rises as the search goes on.
    """
    n = u.shape[0]
    words = mask.shape[0]
    cap = hb.shape[0]
    nc = 2 * batch
    Bd = np.empty(nc, np.int64)
    Br = np.empty(nc, np.int64)
    BE = np.empty(nc)
    BM = np.empty((nc, words), np.uint64)
    BG = np.empty((nc, n))
    BY = np.empty((nc, n))
    Bpb = np.empty(nc)
    Bbnd = np.empty(nc)
    Bstats = np.zeros((nc, 8), np.int64)
    ypar = np.empty(n)
    leafmask = np.empty(words, np.uint64)
    budget = node_budget
    while True:
        if dive[1] == 1:
            before = stats[ST_NODES]
            done = bnb_kbest(W, u, Q, s_shift, lam_d, order, T, m, topE, topM, ts, seed_cutoff,
                             slack, use_row, use_qp, qp_iter, qp_min_free, stack_phase, stack_dir,
                             stack_r, stack_E, stack_bnd, Y, g, mask, pos, budget, stats, dive[0])
            budget -= stats[ST_NODES] - before
            if not done:
                return False
            dive[1] = 0
        if hs[0] == 0:
            return True
        thr = topk_cutoff(topE, ts, seed_cutoff) + slack
        if hb[0] > thr:
            hs[0] = 0  # every open node is pruned
            return True
        if budget <= 0:
            return False
        cnt = 0
        while cnt <= nc - 2 and hs[0] > 0 and budget > 0 and hb[0] <= thr:
            bnd, d, r, E = _heap_pop(hb, hd, hr, hE, hM, hY, hs, mask, ypar)
            _field_of(W, mask, g)
            if n - d <= dive_free or hs[0] >= cap - nc - 2:
                if cnt > 0:  # finish the batch first
                    _heap_push(hb, hd, hr, hE, hM, hY, hs, bnd, d, r, E, mask, ypar)
                    break
                stats[ST_DIVES] += 1
                stack_phase[d] = 0
                stack_r[d] = r
                stack_E[d] = E
                for a in range(n):
                    Y[d][a] = ypar[a]
                pos[0] = d
                dive[0] = d
                dive[1] = 1
                dive_bnd[0] = bnd
                break
            budget -= 2  # two children are evaluated (counted as nodes)
            stats[ST_BF_EXPANDED] += 1
            j = order[d]
            for child in range(2):
                if child == 0:  # remove j
                    E1 = E + u[j] + 2.0 * g[j]
                    r1 = r - 1
                    for i in range(n):
                        g[i] += W[j, i]
                    set_bit(mask, j)
                else:
                    E1 = E
                    r1 = r
                stats[ST_NODES] += 1
                if not _leaf(W, u, order, d + 1, r1, E1, g, mask, leafmask, topE, topM, ts,
                             seed_cutoff, slack, stats):
                    Bd[cnt] = d + 1
                    Br[cnt] = r1
                    BE[cnt] = E1
                    BM[cnt, :] = mask
                    BG[cnt, :] = g
                    BY[cnt, :] = ypar
                    Bpb[cnt] = bnd
                    cnt += 1
                if child == 0:
                    for i in range(n):
                        g[i] -= W[j, i]
                    clear_bit(mask, j)
        if cnt == 0:
            continue
        thr = topk_cutoff(topE, ts, seed_cutoff) + slack
        Bstats[:cnt, :] = 0
        _batch_bounds(u, Q, s_shift, lam_d, order, T, use_row, use_qp, bf_qp_iter, qp_min_free,
                      cnt, Bd, Br, BE, BG, BY, thr, Bbnd, Bstats)
        for i in range(cnt):
            for q in range(8):
                stats[q] += Bstats[i, q]
            cb = Bbnd[i] if Bbnd[i] > Bpb[i] else Bpb[i]
            if cb <= thr:
                _heap_push(hb, hd, hr, hE, hM, hY, hs, cb, Bd[i], Br[i], BE[i], BM[i], BY[i])
    return True
