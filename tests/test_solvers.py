"""Tests of cboprune.solvers: exactness against enumeration, constraints, ties, anytime, QUBO."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from cboprune.core.ranking import Ranking
from cboprune.solvers import energy, enumerate_exhaustive, make_problem, solve, to_qubo
from cboprune.solvers.qubo import Qubo
from cboprune.solvers.synthetic import gradient_gram, wishart


def brute_force(H, m, k, linear=None, keep=(), force=(), removable=None):
    """Pure-Python reference: all feasible states sorted by (energy, indices)."""
    n = H.shape[0]
    allowed = set(range(n)) - set(keep)
    if removable is not None:
        allowed &= set(removable)
    free = sorted(allowed - set(force))
    out = []
    for comb in itertools.combinations(free, m - len(force)):
        s = tuple(sorted(comb + tuple(force)))
        x = np.zeros(n)
        x[list(s)] = 1
        e = float(x @ H @ x + (0.0 if linear is None else linear @ x))
        out.append((e, s))
    out.sort()
    return out[:k]


def assert_same_ranking(r: Ranking, ref: Ranking | list, rtol: float = 1e-9) -> None:
    """Same energies rank by rank; same states except inside tie groups (compared as sets),
    the last tie group possibly truncated differently."""
    if isinstance(ref, Ranking):
        ref_e = [c.score for c in ref]
        ref_s = [c.removed for c in ref]
    else:
        ref_e = [e for e, _ in ref]
        ref_s = [s for _, s in ref]
    got_e = [c.score for c in r]
    got_s = [c.removed for c in r]
    assert len(got_e) == len(ref_e)
    scale = max(1e-300, max(abs(e) for e in ref_e))
    np.testing.assert_allclose(got_e, ref_e, rtol=0, atol=rtol * scale)
    i = 0
    tol = 1e-9 * scale
    while i < len(ref_e):
        j = i + 1
        while j < len(ref_e) and ref_e[j] - ref_e[j - 1] <= tol:
            j += 1
        if j < len(ref_e):
            assert set(got_s[i:j]) == set(ref_s[i:j]), (i, got_s[i:j], ref_s[i:j])
        i = j


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 25))
    m = int(rng.integers(2, n - 1))
    k = int(rng.choice([1, 5, 20, 100]))
    if seed % 2:
        H = gradient_gram(n, int(rng.integers(16, 200)), rng)
    else:
        H = wishart(n, int(rng.integers(max(2, n // 2), 3 * n)), rng)
        H *= np.outer(s := np.exp(rng.normal(size=n)), s)  # uneven scales
    return H, n, m, k


# ------------------------------------------------------------------------------ validation


def test_validation_errors():
    H = wishart(6, 10, 0)
    with pytest.raises(ValueError, match="square"):
        solve(np.ones((3, 4)), 1)
    with pytest.raises(ValueError, match="symmetric"):
        A = H.copy()
        A[0, 1] += 1.0
        solve(A, 2)
    with pytest.raises(ValueError, match="NaN"):
        A = H.copy()
        A[0, 0] = np.nan
        solve(A, 2)
    with pytest.raises(ValueError, match="between"):
        solve(H, 7)
    with pytest.raises(ValueError, match="between"):
        solve(H, -1)
    with pytest.raises(ValueError, match="between"):
        solve(H, 1, force_remove=[0, 1])
    with pytest.raises(ValueError, match="between"):
        solve(H, 5, keep=[0, 1])
    with pytest.raises(ValueError, match="k must be"):
        solve(H, 2, 0)
    with pytest.raises(ValueError, match="both in keep"):
        solve(H, 2, keep=[1], force_remove=[1])
    with pytest.raises(ValueError, match="outside"):
        solve(H, 2, keep=[6])
    with pytest.raises(ValueError, match="not in removable"):
        solve(H, 2, force_remove=[0], removable=[1, 2, 3])
    with pytest.raises(ValueError, match="linear"):
        solve(H, 2, linear=np.ones(5))
    with pytest.raises(ValueError, match="unknown method"):
        solve(H, 2, method="gurobi")
    with pytest.raises(ValueError, match="time_limit"):
        solve(H, 2, time_limit=0)


# ------------------------------------------------------------------------------ enumeration


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_enumeration_matches_brute_force_all_m(n):
    rng = np.random.default_rng(n)
    H = wishart(n, 7, rng)
    c = rng.normal(size=n)
    for m in range(n + 1):
        k = math.comb(n, m) + 3  # more than feasible: all states come back
        r = enumerate_exhaustive(H, m, k, linear=c)
        ref = brute_force(H, m, k, linear=c)
        assert r.exact and len(r) == math.comb(n, m)
        assert_same_ranking(r, ref)
        assert [c_.rank for c_ in r] == list(range(len(r)))


def test_enumeration_with_constraints():
    rng = np.random.default_rng(3)
    H = gradient_gram(12, 40, rng)
    ref = brute_force(H, 5, 30, keep=(0, 11), force=(3,), removable=range(1, 11))
    r = enumerate_exhaustive(H, 5, 30, keep=(0, 11), force_remove=(3,), removable=range(1, 11))
    assert_same_ranking(r, ref)
    for c in r:
        assert 3 in c.removed and 0 not in c.removed and 11 not in c.removed
        assert c.score == pytest.approx(energy(H, c.removed), rel=1e-12)


# ------------------------------------------------------------------------------ exact branch-and-bound


@pytest.mark.parametrize("seed", range(40))
def test_bnb_equals_enumeration(seed):
    H, n, m, k = random_case(seed)
    ref = enumerate_exhaustive(H, m, k)
    r = solve(H, m, k, method="exact")
    assert r.exact and r.info["solver"] == "branch-and-bound"
    assert_same_ranking(r, ref)
    assert [c.removed for c in r] == [c.removed for c in ref]  # no ties in continuous data
    assert r.lower_bound == pytest.approx(r[-1].score)
    assert r.info["gap"] == 0.0


@pytest.mark.parametrize("bound", ["row", "qp", "both"])
def test_bnb_each_bound_alone_is_exact(bound):
    rng = np.random.default_rng(11)
    H = gradient_gram(18, 64, rng)
    ref = enumerate_exhaustive(H, 7, 40)
    r = solve(H, 7, 40, method="exact", bound=bound)
    assert [c.removed for c in r] == [c.removed for c in ref]


def test_bnb_linear_term_and_constraints():
    rng = np.random.default_rng(5)
    H = wishart(16, 30, rng)
    c = rng.normal(size=16) * 0.5  # negative entries too
    kw = dict(linear=c, keep=(2, 9), force_remove=(0, 15), removable=[i for i in range(16) if i != 4])
    ref = brute_force(H, 8, 50, linear=c, keep=(2, 9, 4), force=(0, 15))
    for method in ("exact", "enumerate", "auto"):
        r = solve(H, 8, 50, method=method, **kw)
        assert r.exact
        assert_same_ranking(r, ref)


def test_bnb_k_larger_than_feasible_and_edge_m():
    H = wishart(7, 12, 1)
    r = solve(H, 2, 1000, method="exact")
    assert len(r) == math.comb(7, 2) and r.exact
    assert_same_ranking(r, brute_force(H, 2, 1000))
    for m in (0, 1, 6, 7):
        r = solve(H, m, 5, method="exact")
        assert_same_ranking(r, brute_force(H, m, 5))


def test_bnb_n40_against_enumeration():
    # C(40, 3) enumeration is instant; a real branching case with many rows
    H = gradient_gram(40, 128, 7)
    ref = enumerate_exhaustive(H, 3, 100)
    r = solve(H, 3, 100, method="exact")
    assert [c.removed for c in r] == [c.removed for c in ref]


def test_non_psd_matrix_still_exact():
    rng = np.random.default_rng(2)
    A = rng.normal(size=(14, 14))
    H = (A + A.T) / 2  # indefinite
    ref = enumerate_exhaustive(H, 6, 20)
    r = solve(H, 6, 20, method="exact")
    assert_same_ranking(r, ref)


# ------------------------------------------------------------------------------ ties


def test_ties_are_marked_and_ordered_lexicographically():
    # identity: every state has energy M -> one tie group in lexicographic order
    H = np.eye(6)
    for method in ("exact", "enumerate"):
        r = solve(H, 3, 8, method=method)
        assert [c.removed for c in r] == list(itertools.combinations(range(6), 3))[:8]
        assert not r[0].tied_with_previous
        assert all(c.tied_with_previous for c in r.candidates[1:])
    # two identical blocks (1 and 4) make degenerate pairs
    rng = np.random.default_rng(0)
    A = rng.normal(size=(30, 8))
    A[:, 4] = A[:, 1]
    H = A.T @ A / 30
    r1 = solve(H, 3, 30, method="exact")
    r2 = enumerate_exhaustive(H, 3, 30)
    assert_same_ranking(r1, r2)
    n_ties = sum(c.tied_with_previous for c in r1)
    assert n_ties > 0
    for a, b in zip(r1.candidates, r1.candidates[1:]):
        if b.tied_with_previous:
            assert a.removed < b.removed
            assert abs(b.score - a.score) <= r1.info["tie_abs"]


@pytest.mark.parametrize("quick_s", [0.0, 1.0])
def test_constant_energy_returns_the_lexicographically_first_states(quick_s):
    # H = 0 (gates without effect), a constant diagonal, equal blocks equally correlated: every
    # state ties; C(40, 12) is too many to enumerate and the search can prune nothing among exact
    # ties, so this used to run for ever
    for H in (np.zeros((40, 40)), 2.5 * np.eye(40), -0.01 * np.ones((40, 40)) - np.eye(40)):
        r = run_bnb_ranking(H, 12, 5, quick_s=quick_s, keep=[0, 3], force_remove=[39])
        assert r.exact and len(r) == 5
        free = [i for i in range(40) if i not in (0, 3, 39)]
        want = [tuple(sorted((39,) + c)) for c in itertools.islice(itertools.combinations(free, 11), 5)]
        assert [c.removed for c in r] == want
        assert all(c.score == pytest.approx(12 * H[0, 0] + 12 * 11 * H[0, 1]) for c in r)
    r = solve(np.zeros((40, 40)), 12, 3, method="auto")
    assert [c.removed for c in r] == list(itertools.islice(itertools.combinations(range(40), 12), 3))


def test_tie_tolerance_groups_near_degenerate():
    H = np.diag([1.0, 1.0 + 1e-13, 2.0, 3.0])
    r = solve(H, 1, 4, method="enumerate", tie_tol=1e-9)
    assert [c.removed for c in r][:2] == [(0,), (1,)] and r[1].tied_with_previous
    r = solve(H, 1, 4, method="enumerate", tie_tol=0.0)
    assert not r[1].tied_with_previous


# ------------------------------------------------------------------------------ anytime


def test_anytime_budget_reports_certified_gap():
    H = wishart(40, 60, 4)
    m, k = 14, 10
    full = solve(H, m, k, method="exact")
    assert full.exact
    r = solve(H, m, k, method="exact", node_limit=50)
    assert not r.exact
    assert r.info["nodes"] <= 50
    lb = r.lower_bound
    assert lb is not None and r.info["gap"] >= 0.0
    assert r.info["gap"] == pytest.approx(r[-1].score - lb)
    # certified: no state outside the returned list is below the bound
    listed = {c.removed for c in r}
    for c in full:
        if c.removed not in listed:
            assert c.score >= lb - 1e-12
    # and the first n_certified entries are truly the lowest states
    nc = r.info["n_certified"]
    assert [c.removed for c in r.candidates[:nc]] == [c.removed for c in full.candidates[:nc]]
    # states returned are valid and sorted
    assert all(len(c.removed) == m for c in r)
    assert [c.score for c in r] == sorted(c.score for c in r)


def test_auto_uses_enumeration_for_small_and_bnb_for_large():
    H = wishart(12, 20, 0)
    assert solve(H, 4, 5).info["solver"] == "enumerate"
    H = gradient_gram(44, 128, 0)
    r = solve(H, 20, 5, time_limit=30)
    assert r.info["solver"] == "branch-and-bound" and r.exact


# ------------------------------------------------------------------------------ heuristics


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tabu", "tempering"])
def test_heuristics_return_distinct_low_states(method):
    H = gradient_gram(20, 64, 9)
    ref = enumerate_exhaustive(H, 8, 20)
    r = solve(H, 8, 20, method=method, seed=1)
    assert not r.exact and len(r) == 20
    assert len({c.removed for c in r}) == 20
    assert all(len(c.removed) == 8 for c in r)
    assert r[0].removed == ref[0].removed  # easy instance: the ground state is found
    assert r.lower_bound is not None and r.lower_bound <= ref[0].score + 1e-12
    # every reported state is scored correctly, never better than the true k-th
    for i, c in enumerate(r):
        assert c.score == pytest.approx(energy(H, c.removed), rel=1e-12)
        assert c.score >= ref[i].score - 1e-12


def test_tabu_large_n():
    H = gradient_gram(160, 256, 3)
    r = solve(H, 40, 25, method="tabu")
    assert len({c.removed for c in r}) == 25
    assert r.lower_bound <= r[0].score


# ------------------------------------------------------------------------------ QUBO


def _qubo_bruteforce(q: Qubo, k: int):
    n = q.matrix.shape[0]
    X = ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(float)
    e = np.einsum("si,ij,sj->s", X, q.matrix, X) + q.offset
    order = np.lexsort((np.arange(2**n), e))[:k]
    return [(float(e[i]), q.decode(X[i])) for i in order]


@pytest.mark.parametrize("seed", range(4))
def test_qubo_ground_state_equals_constrained(seed):
    rng = np.random.default_rng(seed)
    n = 12
    H = gradient_gram(n, 40, rng) if seed % 2 else wishart(n, 20, rng)
    c = rng.normal(size=n) * 0.3 if seed == 3 else None
    m = 5
    q = to_qubo(H, m, linear=c)
    ref = solve(H, m, 1, linear=c, method="exact")
    (e0, s0), = _qubo_bruteforce(q, 1)
    assert s0 == ref[0].removed
    assert e0 == pytest.approx(ref[0].score, rel=1e-9, abs=1e-12)


def test_qubo_k_lowest_and_constraints():
    rng = np.random.default_rng(8)
    H = wishart(13, 26, rng)
    q = to_qubo(H, 6, k=8, keep=(0,), force_remove=(12,))
    ref = solve(H, 6, 8, keep=(0,), force_remove=(12,), method="exact")
    got = _qubo_bruteforce(q, 8)
    assert [s for _, s in got] == [c.removed for c in ref]
    np.testing.assert_allclose([e for e, _ in got], [c.score for c in ref], rtol=1e-9)
    assert q.variables == tuple(range(1, 12))


def test_qubo_small_penalty_is_flagged_and_breaks():
    H = np.eye(4) + 0.1
    q = to_qubo(H, 2, penalty=1e-6)
    (_, s0), = _qubo_bruteforce(q, 1)
    assert s0 == ()  # too small a penalty: the empty set wins, as the rule predicts


def test_qubo_files_roundtrip(tmp_path):
    H = gradient_gram(9, 30, 1)
    q = to_qubo(H, 4)
    q.write_json(tmp_path / "p.json")
    q2 = Qubo.read_json(tmp_path / "p.json")
    np.testing.assert_allclose(q2.matrix, q.matrix)
    assert q2.offset == q.offset and q2.variables == q.variables
    d = json.loads((tmp_path / "p.json").read_text())
    # a damaged file is a ValueError naming it, never a KeyError / IndexError from deep inside
    for damage in ({"quadratic": [[0, 99, 1.0]]}, {"quadratic": [[3, 3, 1.0]]}, {"linear": [1.0]},
                   {"n_remove": None}):
        (tmp_path / "bad.json").write_text(json.dumps({**d, **damage}))
        with pytest.raises(ValueError, match="malformed"):
            Qubo.read_json(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in d.items() if k != "offset"}))
    with pytest.raises(ValueError, match="malformed"):
        Qubo.read_json(tmp_path / "bad.json")
    q.write_qubo(tmp_path / "p.qubo")
    lines = (tmp_path / "p.qubo").read_text().splitlines()
    header = [ln for ln in lines if ln.startswith("p qubo")][0].split()
    n, n_diag, n_coup = int(header[3]), int(header[4]), int(header[5])
    Q = np.zeros((n, n))
    body = [ln for ln in lines if ln and ln[0].isdigit()]
    assert len(body) == n_diag + n_coup
    for ln in body:
        i, j, v = ln.split()
        Q[int(i), int(j)] = float(v)
    np.testing.assert_allclose(Q, q.matrix)
    x = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0])
    assert q.energy(x) == pytest.approx(energy(H, np.flatnonzero(x)))


def test_qubo_dimod_bqm():
    dimod = pytest.importorskip("dimod")
    H = wishart(8, 16, 2)
    q = to_qubo(H, 3)
    bqm = q.to_bqm()
    assert bqm.vartype == dimod.BINARY
    ss = dimod.ExactSolver().sample(bqm)
    best = ss.first
    x = np.array([best.sample[i] for i in range(8)])
    ref = solve(H, 3, 1, method="enumerate")
    assert q.decode(x) == ref[0].removed
    assert best.energy == pytest.approx(ref[0].score, rel=1e-9)


def test_problem_reduction_energy_consistency():
    rng = np.random.default_rng(1)
    H = wishart(10, 20, rng)
    c = rng.normal(size=10)
    p = make_problem(H, 4, 3, linear=c, force_remove=(2,), keep=(5,))
    assert p.m == 3 and p.n_free == 8
    # energy of a free subset + const equals the full energy
    T = [0, 3, 6]
    full = tuple(sorted([int(p.free[t]) for t in T] + [2]))
    e_red = sum(p.u[T]) + sum(p.W[a, b] for a in T for b in T) + p.const
    assert e_red == pytest.approx(energy(H, full, c))


@pytest.mark.parametrize("node_limit", [20, 300, 3000])
def test_anytime_with_best_first_phase_is_sound(node_limit):
    H, m, k = wishart(22, 30, 12), 9, 30
    full = enumerate_exhaustive(H, m, k)
    r = solve(H, m, k, method="exact", node_limit=node_limit)
    if r.exact:
        assert [c.removed for c in r] == [c.removed for c in full]
    else:
        listed = {c.removed for c in r}
        assert all(c.score >= r.lower_bound - 1e-12 for c in full if c.removed not in listed)
        nc = r.info["n_certified"]
        assert [c.removed for c in r][:nc] == [c.removed for c in full][:nc]
    assert all(c.score >= f.score - 1e-12 for c, f in zip(r, full))


def run_bnb_ranking(H, m, k, keep=(), force_remove=(), **kw):
    """The branch-and-bound driver with its internal knobs (quick phase, dives, pool) exposed."""
    from cboprune.solvers._problem import finalize
    from cboprune.solvers.bnb import run_bnb

    p = make_problem(H, m, k, keep=keep, force_remove=force_remove)
    res = run_bnb(p, k, **kw)
    return finalize(p, res.sets, tie_tol=1e-9, exact=res.complete,
                    lower_bound=None if res.complete else res.open_bound, info=res.info)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("dive_free,pool", [(0, 64.0), (6, 64.0), (0, 1e-4), (1000, 64.0)])
def test_best_first_with_dives_equals_enumeration(seed, dive_free, pool):
    # quick_s=0: straight to the optimized shift and the best-first search; dive_free 0 = pure
    # best-first, 1000 = one dive from the root, a 16-node pool (1e-4 MiB) forces dives when full
    H, n, m, k = random_case(seed)
    ref = enumerate_exhaustive(H, m, k)
    r = run_bnb_ranking(H, m, k, quick_s=0.0, dive_free=dive_free, pool_mb=pool)
    assert r.exact
    assert [c.removed for c in r] == [c.removed for c in ref]
    assert r.info["relaxation_shift"] in ("dnn", "optimized", "uniform", "scaled", "none")
    if dive_free == 0 and pool > 1:
        assert r.info["dives"] == 0
    if dive_free == 1000:
        assert r.info["dives"] == 1 and r.info["nodes_best_first"] == 0


@pytest.mark.parametrize("node_limit", [5, 60, 600])
@pytest.mark.parametrize("dive_free", [0, 8])
def test_best_first_anytime_certificate_is_sound(node_limit, dive_free):
    H, m, k = wishart(26, 40, 3), 11, 15
    full = enumerate_exhaustive(H, m, k)
    r = run_bnb_ranking(H, m, k, quick_s=0.0, node_limit=node_limit, dive_free=dive_free)
    assert r.info["nodes"] <= node_limit + 2  # a best-first expansion evaluates two children
    if r.exact:
        assert [c.removed for c in r] == [c.removed for c in full]
        return
    listed = {c.removed for c in r}
    assert all(c.score >= r.lower_bound - 1e-12 for c in full if c.removed not in listed)
    nc = r.info["n_certified"]
    assert [c.removed for c in r][:nc] == [c.removed for c in full][:nc]
    assert r.lower_bound >= r.info["root_bound"] - 1e-12  # best-first never loses the root


def test_progress_callback_reports_rising_bound():
    H = gradient_gram(40, 64, 1)
    seen = []
    run_bnb_ranking(H, 16, 5, quick_s=0.0, chunk_nodes=200, progress=seen.append)
    assert seen and all({"nodes", "lower_bound", "cutoff", "elapsed_s"} <= set(d) for d in seen)
    lbs = [d["lower_bound"] for d in seen]
    assert all(b >= a - 1e-12 for a, b in zip(lbs, lbs[1:]))  # best-first: monotone certificate


def test_solve_passes_progress_to_branch_and_bound():
    seen = []
    H = wishart(64, 64, 5)
    r = solve(H, 32, 5, method="exact", node_limit=3000, progress=seen.append)
    assert seen and seen[-1]["nodes"] <= 3000 + 2
    assert all(d["lower_bound"] <= d["cutoff"] + 1e-9 for d in seen)
    assert r.lower_bound is None or r.lower_bound >= seen[0]["lower_bound"] - 1e-9


@pytest.mark.parametrize("quick_s", [0.0, 1.0])
def test_rank_deficient_matrix_stays_exact(quick_s):
    # 8 samples for 22 blocks: H has rank 8, lambda_min on 1^perp is ~0 (the common case)
    H = gradient_gram(22, 8, 4)
    assert np.linalg.matrix_rank(H) <= 8
    ref = enumerate_exhaustive(H, 9, 25)
    r = run_bnb_ranking(H, 9, 25, quick_s=quick_s)
    assert r.exact
    assert [c.removed for c in r] == [c.removed for c in ref]


@pytest.mark.parametrize("threads", [1, 2])
def test_best_first_same_result_with_one_or_two_threads(threads):
    H, n, m, k = random_case(7)
    ref = enumerate_exhaustive(H, m, k)
    r = run_bnb_ranking(H, m, k, quick_s=0.0, threads=threads, dive_free=0)
    assert r.exact and r.info["threads"] == threads
    assert [c.removed for c in r] == [c.removed for c in ref]


@pytest.mark.parametrize("seed", range(6))
def test_dnn_surrogate_bounds_validly_and_tighter(seed):
    # x^T N x >= 0 on states: the surrogate's root bound lies below every state, above the plain one
    from cboprune.solvers._bounds import bound_view, dnn_surrogate, relaxation_shifts, root_qp

    H = wishart(18, 30, seed) if seed % 2 else gradient_gram(18, 40, seed)
    p = make_problem(H, 6, 1)
    found = dnn_surrogate(p, time_budget=10.0)
    assert found is not None
    W_bound, s, lb_dnn, _, info = found
    N = p.W - W_bound
    assert np.all(N >= 0) and np.allclose(N, N.T) and np.all(np.diag(N) == 0)
    assert lb_dnn == pytest.approx(root_qp(bound_view(p, W_bound), s)[0], abs=1e-9)
    assert info["solves"][0]["eps"] == 1e-4
    lb_plain = max(root_qp(p, sh)[0] for sh in relaxation_shifts(p).values())
    e0 = enumerate_exhaustive(H, 6, 1)[0].score
    assert lb_dnn <= e0 + 1e-9
    assert lb_dnn >= lb_plain - 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_search_on_the_dnn_surrogate_equals_enumeration(seed):
    H = wishart(22, 30, seed) if seed % 2 else gradient_gram(22, 60, seed)
    m, k = 7 + seed % 3, 12
    ref = enumerate_exhaustive(H, m, k)
    r = run_bnb_ranking(H, m, k, quick_s=0.0, dive_free=seed % 2 * 6)
    assert r.exact and r.info["relaxation_shift"].startswith("dnn")
    assert [c.removed for c in r] == [c.removed for c in ref]
    assert r.info["dnn"]["root_bound"] <= ref[0].score + 1e-9
    plain = run_bnb_ranking(H, m, k, quick_s=0.0, surrogate="none")
    assert [c.removed for c in plain] == [c.removed for c in ref] and "dnn" not in plain.info
