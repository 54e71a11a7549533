"""Training-free linear repair (ReplaceMe-style): a linear stand-in for each removed run of blocks,
folded into the kept weights so the checkpoint keeps its standard architecture.

For a maximal run of removed blocks a..b, one calibration pass of the original model gives, at
every real token, the state leaving the run `y = h_{b+1}` and the state entering it `h_a`, which
the preceding kept block p = a-1 writes as  h_a = r + d,  with d = c * proj(z) the contribution of
its FFN output projection (c = 1 except Granite's `residual_multiplier`) and r everything else
(the residual entering p plus p's attention). Folding T into that projection
(proj(z) -> proj(z) T, weight and bias) makes p output  r + d T  exactly, so T is fitted to

    min_T  sum_t w_t || (y_t - r_t) - d_t T ||^2 + lam ||T||_F^2       (rows are tokens, T: [D, D])

with w_t = 1 ("lstsq") or w_t = 1 / ||y_t||^2 ("cosine": a closed-form surrogate of the cosine
distance, see docs/repair.md). A run starting at block 0 maps the whole first-block input:
the embeddings (all modules summing to it, e.g. GPT-2's wte + wpe) are multiplied by T, which
is exact too. XᵀWX and XᵀWY are accumulated in float64 batch by batch; no activations are kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cboprune.core.choices import REPAIR_OBJECTIVES, REPAIR_RIDGE
from cboprune.data import CalibrationSet
from cboprune.core.errors import CBOPruneError
from cboprune.models.architectures import ArchSpec, block_kinds, decoder_config, resolve
from cboprune.models.surgery import remove_blocks, validate_removal

log = logging.getLogger(__name__)

OBJECTIVES, DEFAULT_RIDGE = REPAIR_OBJECTIVES, REPAIR_RIDGE


@dataclass(frozen=True)
class Run:
    """Removed blocks first..last (original indices, inclusive); folded into block first-1, or into the
    embeddings when first == 0."""

    first: int
    last: int

    @property
    def blocks(self) -> list[int]:
        return list(range(self.first, self.last + 1))


def removed_runs(removed: Sequence[int]) -> list[Run]:
    """The maximal runs of consecutive indices in `removed` (sorted)."""
    runs: list[Run] = []
    for i in sorted(set(removed)):
        if runs and runs[-1].last == i - 1:
            runs[-1] = Run(runs[-1].first, i)
        else:
            runs.append(Run(i, i))
    return runs


@dataclass
class Moments:
    """Streamed normal equations of one run: A = XᵀWX, B = XᵀWY [D, D], yy = Σ w||Y||², hh = Σ w||y||²."""

    A: torch.Tensor
    B: torch.Tensor
    yy: float = 0.0
    hh: float = 0.0
    n_tokens: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, objective: str) -> None:
        """x: [n, D] what T multiplies, y: [n, D] what x T should equal, target: [n, D] the state leaving the run."""
        x, y, target = x.double(), y.double(), target.double()
        if objective == "cosine":
            w = target.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-12).rsqrt()
            x, y, target = x * w, y * w, target * w  # sqrt-weights on the rows
        self.A += x.T @ x
        self.B += x.T @ y
        self.yy += float(y.pow(2).sum())
        self.hh += float(target.pow(2).sum())
        self.n_tokens += x.shape[0]

    def error(self, T: torch.Tensor) -> float:
        """Σ w||target - repaired||² / Σ w||target||² for the map T (the identity: plain removal)."""
        err = self.yy - 2 * float((T * self.B).sum()) + float((T * (self.A @ T)).sum())
        return max(err, 0.0) / max(self.hh, 1e-30)


@dataclass
class RepairPlan:
    """Where each run's map goes: `fold` names the projection (or the embeddings) it is folded into."""

    spec: ArchSpec
    layers_path: str
    runs: list[Run]
    fold: list[list[str]]  # qualified module names per run
    scale: float = 1.0


def plan_repair(model: nn.Module, removed: Sequence[int]) -> RepairPlan:
    """Check that each removed run's map can be folded exactly; one-line CBOPruneError otherwise."""
    _, _, layers = resolve(model)
    return plan_runs(model, removed_runs(validate_removal(removed, len(layers))))


def plan_runs(model: nn.Module, runs: Sequence[Run]) -> RepairPlan:
    """The fold targets of `runs` (any runs, e.g. those of several configurations fitted in one pass)."""
    spec, path, layers = resolve(model)
    model_type = getattr(decoder_config(model), "model_type", "?")
    if spec.repair_fold is None:
        raise CBOPruneError(f"linear repair of model type {model_type!r} is not possible: {spec.repair_refusal}; "
                            "remove the blocks without --repair (or heal instead)")
    kinds = block_kinds(model, spec, len(layers))
    fold = []
    for run in runs:
        if run.first == 0:
            fold.append(_embedding_names(model, spec))
            continue
        p = run.first - 1
        if "moe" in kinds[p].split("+"):
            raise CBOPruneError(f"linear repair of blocks {run.blocks} would fold into block {p}, whose FFN is a "
                                "mixture of experts (not implemented): keep a dense block before the gap or "
                                "remove without repair")
        name = f"{path}.{p}.{spec.repair_fold}"
        proj = _submodule(model, name)
        if proj is None or _weight_layout(proj) is None:
            raise CBOPruneError(f"model type {model_type!r}: no Linear/Conv1D FFN output projection at {name!r} "
                                "(the architecture table's repair_fold does not match this model)")
        fold.append([name])
    scale = float(getattr(decoder_config(model), spec.repair_scale, 1.0)) if spec.repair_scale else 1.0
    return RepairPlan(spec=spec, layers_path=path, runs=list(runs), fold=fold, scale=scale)


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _embedding_names(model: nn.Module, spec: ArchSpec) -> list[str]:
    if spec.repair_embeddings:
        missing = [n for n in spec.repair_embeddings if _submodule(model, n) is None]
        if missing:
            raise CBOPruneError(f"no embedding module {missing[0]!r} in this model (architecture table entry)")
        return list(spec.repair_embeddings)
    emb = model.get_input_embeddings()
    return [next(n for n, m in model.named_modules() if m is emb)]


def _weight_layout(module: nn.Module) -> str | None:
    """'linear' (y = x Wᵀ + b), 'conv1d' (GPT-2's Conv1D, y = x W + b), 'embedding' (rows), or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return "conv1d"
    return None


# ----------------------------------------------------------------------------- the calibration pass

class _StopForward(Exception):
    """Raised after the last block a fit needs: the rest of the forward (and the LM head) is skipped."""


def _hidden_out(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def _collect_hooks(model: nn.Module, plan: RepairPlan, moments: dict[tuple[Run, str], Moments], state: dict):
    """Forward hooks that stream each run's (x, y) into its moments; `state["mask"]` selects real tokens."""
    layers = model.get_submodule(plan.layers_path)
    last_needed = max(run.last for run in plan.runs)
    handles = []

    def keep(key):
        def hook(module, args, kwargs, output=None):
            h = _hidden_out(output) if output is not None else (args[0] if args else kwargs["hidden_states"])
            state[key] = h[state["mask"]]  # [n, D] real tokens only
        return hook

    def keep_proj(p: int):
        def hook(module, args, output):
            state[("proj", p)] = output[state["mask"]]
        return hook

    def fit(run: Run):
        def hook(module, args, kwargs, output):
            target = _hidden_out(output)[state["mask"]]
            if run.first == 0:
                x, y = state[("in", 0)], target
            else:
                p = run.first - 1
                d = plan.scale * state[("proj", p)].reshape(target.shape)  # the FFN's contribution
                x, y = d, target - (state[("out", p)] - d)  # y: the target minus the rest r of h_a
            for (r, objective), mom in moments.items():
                if r == run:
                    mom.add(x, y, target, objective)
        return hook

    def stop(module, args, output):
        raise _StopForward

    try:
        for run, names in zip(plan.runs, plan.fold):
            if run.first == 0:
                handles.append(layers[0].register_forward_pre_hook(keep(("in", 0)), with_kwargs=True))
            else:
                p = run.first - 1
                handles.append(model.get_submodule(names[0]).register_forward_hook(keep_proj(p)))
                handles.append(layers[p].register_forward_hook(keep(("out", p)), with_kwargs=True))
            handles.append(layers[run.last].register_forward_hook(fit(run), with_kwargs=True))
        # registered last, so it runs after every fit hook of the same block
        handles.append(layers[last_needed].register_forward_hook(stop))
        yield
    finally:
        for h in handles:
            h.remove()


def collect_moments(model: nn.Module, plan: RepairPlan, calibration: CalibrationSet, *,
                    objectives: Sequence[str] = ("lstsq",), batch_size: int = 8) -> dict[tuple[Run, str], Moments]:
    """One pass of the (unpruned) model over `calibration`: the normal equations of every run of
    `plan` under every objective, keyed by (run, objective)."""
    hidden = decoder_config(model).hidden_size
    device = next(model.parameters()).device
    moments = {(run, obj): Moments(torch.zeros(hidden, hidden, dtype=torch.float64, device=device),
                                    torch.zeros(hidden, hidden, dtype=torch.float64, device=device))
               for run in dict.fromkeys(plan.runs) for obj in objectives}
    state: dict = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _collect_hooks(model, plan, moments, state):
            for _, ids, mask in calibration.batches(batch_size):
                ids, mask = ids.to(device), mask.to(device)
                state.clear()
                state["mask"] = mask.bool()
                try:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _StopForward:
                    pass
    finally:
        model.train(was_training)
    return moments


# ----------------------------------------------------------------------------- solve and fold

def solve_map(moments: Moments, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """T = (A + lam I)^-1 B with lam = ridge * mean diagonal of A (scale-free), float64 [D, D]."""
    A = moments.A
    lam = ridge * float(torch.diagonal(A).mean().clamp_min(1e-30))
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(A + lam * eye, moments.B)


@torch.no_grad()
def fold_map(model: nn.Module, module_names: Sequence[str], T: torch.Tensor) -> None:
    """Multiply the outputs of the named modules by T on the right (their weights and biases; exact)."""
    for name in module_names:
        module = model.get_submodule(name)
        layout = _weight_layout(module)
        if layout == "embedding":
            _untie_output_embeddings(model, module)
        W = module.weight
        Td = T.to(W.device)
        if layout == "linear":  # y = x Wᵀ + b  ->  y T = x (Tᵀ W)ᵀ + b T
            new = Td.T @ W.double()
        else:  # Conv1D y = x W + b, Embedding rows: W T
            new = W.double() @ Td
        W.copy_(new.to(W.dtype))
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias.copy_((bias.double() @ Td).to(bias.dtype))


def _untie_output_embeddings(model: nn.Module, embedding: nn.Module) -> None:
    """Folding into tied input embeddings would change the LM head: give the head its own copy."""
    head = model.get_output_embeddings()
    if head is None or head.weight is not embedding.weight:
        return
    head.weight = nn.Parameter(embedding.weight.detach().clone())
    for config in {id(c): c for c in (model.config, decoder_config(model))}.values():
        config.tie_word_embeddings = False
    log.info("untied the LM head from the input embeddings (the repair changes the embeddings)")


def fold_repair(model: nn.Module, plan: RepairPlan, moments: dict[tuple[Run, str], Moments], *,
                objective: str = "lstsq", ridge: float = DEFAULT_RIDGE) -> list[dict[str, Any]]:
    """Solve every run's map from `moments` and fold it into `model` (the model `plan` was made for);
    returns one record per run: blocks, folded modules, tokens, in-sample relative error of the map
    and of plain removal (the identity)."""
    records = []
    for run, names in zip(plan.runs, plan.fold):
        mom = moments[(run, objective)]
        if mom.n_tokens == 0:
            raise CBOPruneError("the calibration set has no real tokens: pass more or longer samples")
        T = solve_map(mom, ridge)
        eye = torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
        records.append({"removed": run.blocks, "fold_into": list(names), "n_tokens": mom.n_tokens,
                        "fit_error": mom.error(T), "identity_error": mom.error(eye)})
        fold_map(model, names, T)
    return records


def check_options(objective: str, ridge: float) -> None:
    if objective not in OBJECTIVES:
        raise CBOPruneError(f"unknown repair objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    if not ridge >= 0:
        raise CBOPruneError(f"--ridge must be >= 0, got {ridge}")


def repair_linear(model: nn.Module, removed: Sequence[int], calibration: CalibrationSet, *,
                  objective: str = "lstsq", ridge: float = DEFAULT_RIDGE, batch_size: int = 8,
                  remove: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Fit a linear map for every maximal run of `removed` on `calibration` (one pass of the ORIGINAL
    `model`), fold each into the kept weights and, with `remove`, remove the blocks (surgery).

    Modifies `model` in place and returns (model, info); info is what removal.json records under
    "repair". With remove=False the blocks stay: gating them off (GateManager at 0) then gives the
    repaired model, for evaluations that gate instead of removing.
    """
    check_options(objective, ridge)
    plan = plan_repair(model, removed)
    start = time.perf_counter()
    moments = collect_moments(model, plan, calibration, objectives=(objective,), batch_size=batch_size)
    runs = fold_repair(model, plan, moments, objective=objective, ridge=ridge)
    if remove:
        remove_blocks(model, removed)
    for r in runs:
        log.info("repair of blocks %s -> %s: relative error %.4f (plain removal %.4f)", r["removed"],
                 r["fold_into"][0], r["fit_error"], r["identity_error"])
    return model, {"method": "linear", "objective": objective, "ridge": ridge, "runs": runs,
                   "calibration": calibration.describe(), "seconds": round(time.perf_counter() - start, 2)}


def check_repairable(model: nn.Module, n_blocks: int) -> None:
    """Refuse --repair before any work when this family's folding is not exact (one line)."""
    plan_repair(model, [min(1, n_blocks - 1)])
