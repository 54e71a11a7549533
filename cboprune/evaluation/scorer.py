"""Batched log-likelihood scoring, rolling perplexity and greedy generation for a causal LM.

Tokenization follows lm-eval-harness's `HFLM` exactly, so the built-in evaluator and
`lm_eval` score the same token sequences:

* a request is a `(context, continuation)` pair of strings; trailing whitespace of the context
  moves to the continuation; `whole = encode(context + continuation)`,
  `context_ids = encode(context)`, `continuation_ids = whole[len(context_ids):]`
  (`encode` is the tokenizer's default, i.e. with its own special-token behaviour);
* an empty context becomes the prefix token (BOS, else EOS);
* a sequence longer than `max_length + 1` tokens is truncated on the left.

Speed comes from three things lm-eval does not do:

1. **Shared-prefix packing.** The requests of one item (the choices of a multiple-choice
   question) usually share their context. They are packed into ONE row: the common token prefix
   once, then each choice's remaining tokens as a segment with its own position ids, under a 4D
   attention mask (a segment sees the prefix and itself). Each item costs one pass over
   `prefix + sum(segments)` tokens instead of `n_choices * (prefix + segment)`. Whether the
   model honours a custom 4D mask is checked once per model by a probe (scores of a packed row
   against unpacked ones); if not, requests are scored one per row.
2. **Logits only where needed.** A pre-hook on the output embedding gathers the hidden states
   of the scored positions, so the vocabulary projection and the log-softmax run on
   `[n_scored, V]` instead of `[B, L, V]`.
3. Rows are sorted by length and batched by a token budget, so padding is small.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from cboprune.models.forward_loss import head_rows

log = logging.getLogger(__name__)

_PROBE_TOLERANCE = 1e-3


@dataclass
class _Request:
    """One tokenized `(context, continuation)` pair."""

    context_ids: list[int]
    continuation_ids: list[int]

    @property
    def whole(self) -> list[int]:
        return self.context_ids + self.continuation_ids


@dataclass
class _Row:
    """A packed row: `prefix` tokens then one segment per request.

    `targets` lists, per request, `(row_position, token_id)` pairs: the logits at row_position
    predict token_id.
    """

    input_ids: list[int]
    position_ids: list[int]
    segment_ids: list[int]  # -1: shared prefix, j >= 0: segment j
    targets: list[list[tuple[int, int]]]
    request_index: list[int]  # global request index of each segment's request
    packed: bool = False


@dataclass
class ScoreResult:
    """Sum of log-probabilities of the continuation and whether greedy decoding reproduces it."""

    logprob: float
    is_greedy: bool
    n_tokens: int


@dataclass
class Scorer:
    """Scores requests on an in-memory causal LM.

    Args:
        model: a `PreTrainedModel` (causal LM), already on its device and in eval mode.
        tokenizer: its tokenizer.
        batch_size: maximum rows per forward pass.
        max_length: context window used for truncation and rolling windows; default: the
            model's `max_position_embeddings` capped at 2048.
        share_prefix: pack the requests of an item around their common prefix (None: decide by
            a probe on the model).
        max_batch_tokens: token budget per forward pass (rows * padded length).
        progress: show tqdm progress bars.
    """

    model: torch.nn.Module
    tokenizer: object
    batch_size: int = 32
    max_length: int | None = None
    share_prefix: bool | None = None
    max_batch_tokens: int = 8192
    progress: bool = True
    _probe_done: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_length is None:
            self.max_length = default_max_length(self.model, self.tokenizer)
        self.device = next(self.model.parameters()).device

    # ------------------------------------------------------------------ tokenization
    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        """The tokenizer's default encoding (as lm-eval's `tok_encode`), without a second BOS."""
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def tokenize_pair(self, context: str, continuation: str) -> _Request:
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return _Request(cont[:1], cont[1:])
            return _Request([self.prefix_token_id], cont)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return _Request(ctx, whole[len(ctx):])

    # ------------------------------------------------------------------ packing
    def _rows_for_group(self, requests: list[_Request], indices: list[int], share: bool) -> list[_Row]:
        """Pack one item's requests into one row (shared prefix) or one row per request."""
        max_len = self.max_length
        too_long = any(len(r.whole) - 1 > max_len for r in requests)
        if share and len(requests) > 1 and not too_long:
            wholes = [r.whole for r in requests]
            p = min(len(r.context_ids) for r in requests)
            common = 0
            first = wholes[0]
            while common < p and all(w[common] == first[common] for w in wholes):
                common += 1
            if common >= 1:
                return [self._packed_row(requests, indices, common)]
        return [self._single_row(r, i) for r, i in zip(requests, indices)]

    def _single_row(self, req: _Request, index: int) -> _Row:
        whole = req.whole
        n_cont = len(req.continuation_ids)
        whole = whole[-(self.max_length + 1):]
        inp = whole[:-1]
        first = len(whole) - n_cont  # index in `whole` of the first continuation token
        targets = [(k - 1, whole[k]) for k in range(first, len(whole))]
        return _Row(inp, list(range(len(inp))), [0] * len(inp), [targets], [index])

    def _packed_row(self, requests: list[_Request], indices: list[int], p: int) -> _Row:
        ids = list(requests[0].whole[:p])
        pos = list(range(p))
        seg = [-1] * p
        targets: list[list[tuple[int, int]]] = []
        for j, req in enumerate(requests):
            whole = req.whole
            start = len(ids)
            tail = whole[p:-1]  # input tokens of this segment (the last token is never input)
            ids += tail
            pos += list(range(p, p + len(tail)))
            seg += [j] * len(tail)
            tj = []
            for k in range(len(req.context_ids), len(whole)):
                src = k - 1  # position in `whole` whose logits predict token k
                row_pos = src if src < p else start + (src - p)
                tj.append((row_pos, whole[k]))
            targets.append(tj)
        return _Row(ids, pos, seg, targets, list(indices), packed=True)

    # ------------------------------------------------------------------ forward
    def _batches(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        order = sorted(rows, key=lambda r: -len(r.input_ids))
        batch: list[_Row] = []
        for row in order:
            longest = len(batch[0].input_ids) if batch else len(row.input_ids)
            if batch and (len(batch) >= self.batch_size or longest * (len(batch) + 1) > self.max_batch_tokens):
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch

    @torch.no_grad()
    def _forward_rows(self, rows: list[_Row]) -> list[list[tuple[float, bool]]]:
        """Score a batch of rows; returns per row, per segment `(logprob, is_greedy)`.

        Shapes: input_ids [B, L]; mask [B, 1, L, L] (bool) when any row is packed; gathered
        hidden states [N, D] -> logits [N, V] with N = number of scored positions.
        """
        b = len(rows)
        length = max(len(r.input_ids) for r in rows)
        pad_id = self.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else self.prefix_token_id
        ids = torch.full((b, length), pad_id, dtype=torch.long)
        pos = torch.zeros((b, length), dtype=torch.long)
        seg = torch.full((b, length), -2, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, :n] = torch.tensor(r.input_ids)
            pos[i, :n] = torch.tensor(r.position_ids)
            pos[i, n:] = torch.arange(r.position_ids[-1] + 1, r.position_ids[-1] + 1 + length - n)
            seg[i, :n] = torch.tensor(r.segment_ids)
        kwargs: dict = {}
        if any(r.packed for r in rows):
            q = torch.arange(length)
            causal = q[None, :] <= q[:, None]  # [L(query), L(key)]
            same = (seg[:, None, :] == -1) | (seg[:, None, :] == seg[:, :, None])  # [B, Lq, Lk]
            kwargs["attention_mask"] = (causal[None] & same)[:, None].to(self.device)
            kwargs["position_ids"] = pos.to(self.device)
        # scored positions, flattened over the batch
        flat_rows, flat_pos, flat_tok = [], [], []
        for i, r in enumerate(rows):
            for tj in r.targets:
                for p_, t in tj:
                    flat_rows.append(i)
                    flat_pos.append(p_)
                    flat_tok.append(t)
        sel = (torch.tensor(flat_rows, device=self.device), torch.tensor(flat_pos, device=self.device))
        def scored(hidden):  # the head runs only on the scored positions: [B, L, D] -> [N, D]
            return hidden[sel] if tuple(hidden.shape[:2]) == (b, length) else None

        with head_rows(self.model, scored) as fired:
            out = self.model(input_ids=ids.to(self.device), use_cache=False, **kwargs)
        logits = out.logits[0] if fired else out.logits[sel]  # [N, V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        tok = torch.tensor(flat_tok, device=logp.device)
        tok_lp = logp.gather(1, tok[:, None])[:, 0].cpu()
        greedy = (logp.argmax(-1) == tok).cpu()
        results: list[list[tuple[float, bool]]] = []
        k = 0
        for r in rows:
            per_seg = []
            for tj in r.targets:
                n = len(tj)
                per_seg.append((float(tok_lp[k:k + n].double().sum()), bool(greedy[k:k + n].all())))
                k += n
            results.append(per_seg)
        return results

    def _run_rows(self, rows: list[_Row], n_requests: int, desc: str) -> list[ScoreResult]:
        out: list[ScoreResult | None] = [None] * n_requests
        batches = list(self._batches(rows))
        for batch in tqdm(batches, desc=desc, disable=not self.progress, leave=False):
            for row, per_seg in zip(batch, self._forward_rows(batch)):
                for idx, tj, (lp, greedy) in zip(row.request_index, row.targets, per_seg):
                    out[idx] = ScoreResult(lp, greedy, len(tj))
        return out  # type: ignore[return-value]

    def _probe_sharing(self) -> bool:
        """Check once that a packed row scores like separate rows (custom 4D masks honoured)."""
        reqs = [self.tokenize_pair("The quick brown fox jumps over the", c)
                for c in (" lazy dog.", " moon tonight", " fence")]
        try:
            packed = self._run_rows(self._rows_for_group(reqs, [0, 1, 2], True), 3, "probe")
        except Exception as exc:  # noqa: BLE001 - any failure means: do not pack for this model
            log.info("shared-prefix packing disabled: the model rejected a 4D mask (%s)", exc)
            return False
        single = self._run_rows([self._single_row(r, i) for i, r in enumerate(reqs)], 3, "probe")
        diff = max(abs(a.logprob - b.logprob) for a, b in zip(packed, single))
        ok = diff < _PROBE_TOLERANCE * max(1.0, max(abs(s.logprob) for s in single))
        log.info("shared-prefix packing %s (probe difference %.2e)", "on" if ok else "off", diff)
        return ok

    def sharing_enabled(self) -> bool:
        if self.share_prefix is None:
            self.share_prefix = self._probe_sharing()
        return bool(self.share_prefix)

    # ------------------------------------------------------------------ public API
    def loglikelihood_groups(self, groups: Sequence[Sequence[tuple[str, str]]],
                             desc: str = "loglikelihood") -> list[list[ScoreResult]]:
        """Score groups of `(context, continuation)` requests (one group per item).

        Requests of a group are packed around their common prefix when sharing is enabled.
        Returns one `ScoreResult` per request, in the groups' shape.
        """
        share = self.sharing_enabled()
        rows: list[_Row] = []
        shape: list[list[int]] = []
        n = 0
        for group in groups:
            reqs = [self.tokenize_pair(c, x) for c, x in group]
            idx = list(range(n, n + len(reqs)))
            n += len(reqs)
            shape.append(idx)
            rows += self._rows_for_group(reqs, idx, share)
        flat = self._run_rows(rows, n, desc)
        return [[flat[i] for i in idx] for idx in shape]

    def rolling_loglikelihood(self, texts: Sequence[str], *, context_length: int | None = None,
                              stride: int | None = None, desc: str = "perplexity") -> list[ScoreResult]:
        """Log-likelihood of whole texts, by windows (see `rolling_windows`).

        Returns per text the summed log-probability of all its tokens and the token count.
        """
        length = context_length or self.max_length
        rows: list[_Row] = []
        owner: list[int] = []
        counts = []
        for t_i, text in enumerate(texts):
            tokens = self.encode(text)
            counts.append(len(tokens))
            for inp, targets in rolling_windows(tokens, self.prefix_token_id, length, stride or length):
                rows.append(_Row(inp, list(range(len(inp))), [0] * len(inp), [targets], [len(owner)]))
                owner.append(t_i)
        flat = self._run_rows(rows, len(owner), desc)
        totals = [0.0] * len(texts)
        for o, r in zip(owner, flat):
            totals[o] += r.logprob
        return [ScoreResult(totals[i], False, counts[i]) for i in range(len(texts))]

    @torch.no_grad()
    def generate_until(self, prompts: Sequence[str], until: Sequence[str], max_gen_toks: int = 256,
                       desc: str = "generate") -> list[str]:
        """Greedy continuations of `prompts`, cut at the first stop string of `until`."""
        tok = self.tokenizer
        stops = list(until)
        if tok.eos_token and tok.eos_token not in stops:
            stops.append(tok.eos_token)
        encoded = [self.encode(p)[-(self.max_length - max_gen_toks):] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        outputs: list[str] = [""] * len(prompts)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        bs = max(1, min(self.batch_size, 16))
        chunks = [order[i:i + bs] for i in range(0, len(order), bs)]
        for chunk in tqdm(chunks, desc=desc, disable=not self.progress, leave=False):
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):  # left padding
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            gen = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=max_gen_toks, do_sample=False, temperature=None, top_p=None, top_k=None,
                stop_strings=stops, tokenizer=tok, pad_token_id=pad_id,
            )
            for r, i in enumerate(chunk):
                text = tok.decode(gen[r, width:], skip_special_tokens=False)
                for s in stops:
                    if s and s in text:
                        text = text.split(s)[0]
                outputs[i] = text
        return outputs


def rolling_windows(tokens: list[int], prefix_token: int, context_length: int,
                    stride: int) -> Iterator[tuple[list[int], list[tuple[int, int]]]]:
    """Windows for the perplexity of a token sequence.

    With `x = [prefix_token] + tokens` (N tokens, window length L), the input `x[j]` predicts
    `tokens[j]`. The first window predicts tokens `[0, min(L, N))` from `x[0:L]`; each later
    window predicts the next `stride` tokens `[a, b)` from the input `x[max(0, b-L):b]`, so every
    prediction after the first window sees at least `L - stride` earlier tokens. `stride == L`
    is lm-eval's `loglikelihood_rolling` protocol (disjoint windows, context_len=1; the last
    window keeps a full-length input). Yields `(input_ids, [(position_in_input, target), ...])`.
    """
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length], got {stride} > {context_length}")
    n = len(tokens)
    if n == 0:
        return
    x = [prefix_token] + tokens
    a = 0
    b = min(context_length, n)
    while True:
        s = max(0, b - context_length)  # window x[s:b] predicts tokens s..b-1 (x index j predicts token j)
        inp = x[s:b]
        yield inp, [(k - s, tokens[k]) for k in range(a, b)]
        if b >= n:
            return
        a, b = b, min(b + stride, n)


def default_max_length(model: torch.nn.Module, tokenizer: object, cap: int = 2048) -> int:
    """The context window used by default: the model's maximum positions, capped at `cap`."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 10**9:
        return min(tml, cap)
    return cap


def perplexity_from(logprob_sum: float, count: int) -> float:
    return math.exp(-logprob_sum / count) if count else float("nan")
