"""The registry of selection methods: every energy model and every peer criterion, by name.

A method is registered once, in its own module, with `register(Method(...))`:

    cboprune/energies/<name>.py    energy models of CBO (their K lowest states, then verification)
    cboprune/baselines/<name>.py   peer criteria (BI, SLEB, ...)

Modules there import torch only inside functions, so listing the registry (CLI choices, `--help`,
config validation, the docs' method table) never loads torch. Everything else reads names,
labels, needs and costs from here: the CLI, `config`, the experiment engine (`compare`, `study`)
and the reports.

Cost model: forward passes of the fitting set (tokens processed), a backward counting as two
forward passes, so the paper's gradient pass costs 3 and iterative Block Influence costs M.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cboprune.core.errors import CBOPruneError

ENERGY, PEER = "energy", "peer"
#: packages whose public modules register methods
PACKAGES = ("cboprune.energies", "cboprune.baselines")


@dataclass(frozen=True)
class Recommendation:
    energy: str
    verify: bool  # re-rank the K lowest states by measured held-out loss
    refine_sweeps: int  # swap-search sweeps on the real loss from the verified pick (0: none)


#: What `cboprune run` does by default (docs/study.md, "The default selection"): measured single
#: removals with the Fisher's pair interactions and a charge per contiguous run of removed blocks
#: (`hybrid`'s run cost), its K lowest states re-ranked by held-out loss plus that charge, then one
#: round of re-centring at the verified pick (`hybrid`'s after_verify) — 18.3 forward passes of the
#: fitting set for two values of M on the default model, against ~2,000 for `measured` with
#: refinement, which ties with the cheap peers after healing. The short-heal judge
#: (`cboprune.engine.judge`) is `--heal-candidates`, off by default. The paper's method is PAPER (no
#: verification); the expensive variants stay available (`--energy measured --refine-sweeps 8`).
RECOMMENDED = Recommendation("hybrid", verify=True, refine_sweeps=0)
PAPER = Recommendation("fisher", verify=False, refine_sweeps=0)


@dataclass(frozen=True)
class Method:
    """One selection method.

    select(context, remove) -> {M: Ranking}: for a peer, its configuration(s) per M; for an energy
    model, its K lowest states per M (`context.top`). `ranked`: the method orders several
    configurations (one-shot scores, energies); otherwise it returns one per M.
    cost(N, M, **options) -> forward passes of the fitting set (see the module docstring)."""

    name: str
    label: str
    kind: str  # ENERGY or PEER
    summary: str
    select: Callable[..., dict] = field(repr=False, compare=False)
    cost: Callable[..., float] = field(repr=False, compare=False)
    cost_formula: str = ""  # the cost model in words, for tables and docs
    reference: str = ""
    needs: tuple[str, ...] = ()  # "gradients", "forward configurations", "hessian-vector products"
    ranked: bool = True
    min_kept: int = 1  # blocks the method can never remove (swm never merges the last block: 2)
    order: int = 100  # position in tables
    options: tuple[str, ...] = ()  # the selection settings it reads (pool, relin_step, swm_rule, ...)
    #: after_verify(context, verified) -> Ranking: an energy model's own search from its verified states
    #: for one M (hybrid: re-centring at the verified pick); None: the verified ranking stands
    after_verify: Callable[..., Any] | None = field(default=None, repr=False, compare=False)
    #: a tag of the algorithm behind fixed settings, part of the key of a study's kept selection step:
    #: change it when the same settings would now select differently (hybrid: its re-centring's shares)
    scheme: str = ""


_REGISTRY: dict[str, Method] = {}
#: other names of a method: `compare` calls the paper's energy "cbo"
ALIASES = {"cbo": "fisher"}
_LOADED = False


def register(method: Method) -> Method:
    if method.kind not in (ENERGY, PEER):
        raise ValueError(f"method {method.name!r}: kind must be {ENERGY!r} or {PEER!r}")
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")
    _LOADED = True


def methods(kind: str | None = None) -> list[Method]:
    """Every registered method (of one kind), in table order."""
    _load()
    out = [m for m in _REGISTRY.values() if kind is None or m.kind == kind]
    return sorted(out, key=lambda m: (m.kind != ENERGY, m.order, m.name))


def names(kind: str | None = None) -> list[str]:
    return [m.name for m in methods(kind)]


def get(name: str) -> Method:
    _load()
    name = ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise CBOPruneError(unknown_message(name, names()))
    return _REGISTRY[name]


def unknown_message(name: str, known: Iterable[str], what: str = "method") -> str:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {name!r}{hint}: available: {', '.join(known)}"


def parse_names(value: str | Iterable[str] | None, kind: str | None = None, *, allow_empty: bool = False,
                extra: Iterable[str] = ()) -> list[str]:
    """Validate a comma-separated list (or list) of method names of one kind, answering an unknown
    name with a suggestion; duplicates dropped, order kept. `extra`: further accepted names."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    known = [*extra, *names(kind)]
    out: list[str] = []
    for item in items:
        item = str(item).strip().lower()
        if not item:
            continue
        if item not in known:
            what = {ENERGY: "energy model", PEER: "method"}.get(kind or "", "method")
            raise CBOPruneError(unknown_message(item, known, what))
        if item not in out:
            out.append(item)
    if not out and not allow_empty:
        raise CBOPruneError(f"no method given: choose from {', '.join(known)}")
    return out


def method_table() -> str:
    """The docs' method table (markdown), generated from the registry."""
    lines = ["| name | kind | method | needs | cost (forward passes of the fitting set) | reference |",
             "|---|---|---|---|---|---|"]
    for m in methods():
        lines.append(f"| `{m.name}` | {m.kind} | {m.label}: {m.summary} | {', '.join(m.needs) or '—'} "
                     f"| {m.cost_formula or '—'} | {m.reference or '—'} |")
    return "\n".join(lines) + "\n"


def selection_cost(name: str, n_blocks: int, n_remove: int, **options: Any) -> float:
    return float(get(name).cost(n_blocks, n_remove, **options))


def entry_label(method: str) -> str:
    """The table label of a comparison row's method name, one rule for every table: "cbo:1" ->
    "CBO:1" (compare's alias of the paper's energy), "fisher:0" -> "CBO fisher (paper) (ground state)",
    "hybrid+verify" -> "... + verify", a peer -> its label ("bi-iter" -> "BI iterative")."""
    base, _, rank = method.split("+")[0].partition(":")
    if base == "cbo":
        return "CBO" + (f":{rank}" if rank else "")
    m = get(base)
    if m.kind != ENERGY:
        return m.label
    suffix = (" + verify" if "+verify" in method else " + verify + refine" if "+refine" in method
              else " + verify + short-heal judge" if "+judge" in method
              else " (ground state)" if rank == "0" else f" (state {rank})")
    return f"{m.label}{suffix}"
