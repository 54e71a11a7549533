"""Cost of the Hessian pass, measured in one run on the same batches: ratios, not absolute speeds.

    python benchmarks/hessian.py                                   # default model, CPU, fp32
    python benchmarks/hessian.py --random-config llama-1b --device cuda --dtype bfloat16 \
        --n-samples 64 --seq-len 1024                              # GPU, bf16, random 1.2B Llama

Printed:
1. Hessian token rate / plain forward token rate (target >= 0.4). The forward runs under
   inference_mode on exactly the batches the Hessian pass uses (length-bucketed, trimmed);
   the Hessian pass is `compute_hessian` itself (one forward + one activation-only backward).
2. The per-sample gate trick vs one backward per sample, on one batch of `--batch-size`: the trick
   is one forward with per-sample gates [B, N] and one backward; the baseline is the same forward
   with shared gates [N] and B backward passes (retain_graph), one per sample's loss. Both the whole
   step and the backward phase alone are compared (target >= 8x at batch 8), and the two A agree.
Each measurement is repeated `--repeats` times, interleaved, and the fastest is kept (the machine
may be shared). Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from cboprune.data.calibration import CalibrationSet
from cboprune.selection.hessian import Fp32GateManager, compute_hessian, model_attention_mask, per_sample_loss, plan_batches

log = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "calib" / "c4_demo.jsonl"
RANDOM_CONFIGS = {  # shapes of public models, random weights: no download needed
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                     tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                     tie_word_embeddings=True, rope_theta=500000.0),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, CalibrationSet, str]:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.random_config:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(**RANDOM_CONFIGS[args.random_config])
        with torch.device(args.device):
            model = LlamaForCausalLM(config).to(dtype).eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (args.n_samples, args.seq_len), generator=g)
        mask = torch.ones_like(ids)
        lengths = torch.randint(args.seq_len // 2, args.seq_len + 1, (args.n_samples,), generator=g)
        for i, n in enumerate(lengths.tolist()):  # varied lengths, as chat calibration has
            mask[i, n:] = 0
        return model, CalibrationSet(ids, mask, source="random tokens"), f"random {args.random_config}"
    from cboprune.data import load_calibration
    from cboprune.models import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    cal = load_calibration(str(args.data), loaded.tokenizer, n_samples=args.n_samples, seq_len=args.seq_len)
    return loaded.model, cal, args.model


def time_forward(model, cal: CalibrationSet, batch_size: int, device: torch.device) -> dict:
    lengths = cal.attention_mask.sum(1).numpy()
    plan = plan_batches(lengths, batch_size, bucket=True)
    tokens = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for idx in plan.batches:
            index = torch.from_numpy(idx)
            mask = cal.attention_mask[index]
            width = int(mask.sum(1).max())
            ids, mask = cal.input_ids[index, :width].to(device), mask[:, :width].to(device)
            model(input_ids=ids, attention_mask=model_attention_mask(mask), use_cache=False).logits
            tokens += int(mask.sum())
    _sync(device)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "tokens_per_second": tokens / seconds}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def time_hessian(model, cal: CalibrationSet, batch_size: int, autocast: str | None) -> dict:
    result = compute_hessian(model, cal, batch_size=batch_size, progress=False, autocast=autocast)
    keep = ("seconds", "tokens_per_second", "peak_memory_gib", "peak_rss_gib", "padding_fraction")
    return {k: result.meta[k] for k in keep if k in result.meta}


def time_trick_vs_naive(model, cal: CalibrationSet, batch_size: int, device: torch.device,
                        autocast: str | None) -> dict:
    """One batch: per-sample gates + 1 backward vs shared gates + B backward passes."""
    ids, mask = cal.input_ids[:batch_size], cal.attention_mask[:batch_size]
    width = int(mask.sum(1).max())
    ids, mask = ids[:, :width].to(device), mask[:, :width].to(device)
    amp = torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast else torch.autocast(
        device.type, enabled=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    out = {}
    try:
        with Fp32GateManager(model) as gates, torch.enable_grad():
            n = gates.n_blocks
            # the trick: per-sample gates [B, N], one backward
            alpha = torch.ones(batch_size, n, device=device, requires_grad=True)
            gates.set(alpha)
            _sync(device)
            t0 = time.perf_counter()
            with amp:
                logits = model(input_ids=ids, attention_mask=model_attention_mask(mask), use_cache=False).logits
                loss = per_sample_loss(logits, ids, mask)
                del logits
            _sync(device)
            t1 = time.perf_counter()
            (a_trick,) = torch.autograd.grad(loss.sum(), alpha)
            _sync(device)
            t2 = time.perf_counter()
            out["trick"] = {"forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0}
            del loss
            # the baseline: shared gates [N], one backward per sample
            alpha = torch.ones(n, device=device, requires_grad=True)
            gates.set(alpha)
            _sync(device)
            t0 = time.perf_counter()
            with amp:
                logits = model(input_ids=ids, attention_mask=model_attention_mask(mask), use_cache=False).logits
                loss = per_sample_loss(logits, ids, mask)
                del logits
            _sync(device)
            t1 = time.perf_counter()
            rows = [torch.autograd.grad(loss[b], alpha, retain_graph=b < batch_size - 1)[0]
                    for b in range(batch_size)]
            _sync(device)
            t2 = time.perf_counter()
            out["per_sample_backward"] = {"forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0}
            a_naive = torch.stack(rows)
            out["max_abs_diff_A"] = float((a_trick - a_naive).abs().max())
            out["max_abs_A"] = float(a_trick.abs().max())
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS), help="random-weight model of this shape")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="calibration file (real model only)")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--autocast", choices=["bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    model, cal, name = load(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {name} ({n_params / 1e6:.0f}M parameters, {args.dtype}"
          f"{', autocast ' + args.autocast if args.autocast else ''}) on {device}; {cal.n_samples} samples, "
          f"{cal.n_tokens} tokens, batch {args.batch_size}, threads {torch.get_num_threads()}")
    time_forward(model, cal, args.batch_size, device)  # warm-up (allocator, kernels, caches)
    runs: dict[str, list[dict]] = {"forward": [], "hessian": [], "trick": []}
    for r in range(args.repeats):
        runs["forward"].append(time_forward(model, cal, args.batch_size, device))
        runs["hessian"].append(time_hessian(model, cal, args.batch_size, args.autocast))
        runs["trick"].append(time_trick_vs_naive(model, cal, args.batch_size, device, args.autocast))
        print(f"  repeat {r + 1}: forward {runs['forward'][-1]['tokens_per_second']:.0f} tok/s, "
              f"hessian {runs['hessian'][-1]['tokens_per_second']:.0f} tok/s, "
              f"trick {runs['trick'][-1]['trick']['total_s']:.2f} s vs per-sample "
              f"{runs['trick'][-1]['per_sample_backward']['total_s']:.2f} s", flush=True)
    fwd = max(runs["forward"], key=lambda x: x["tokens_per_second"])
    hes = max(runs["hessian"], key=lambda x: x["tokens_per_second"])
    trick = min((t["trick"] for t in runs["trick"]), key=lambda x: x["total_s"])
    naive = min((t["per_sample_backward"] for t in runs["trick"]), key=lambda x: x["total_s"])
    bwd_naive = min(t["per_sample_backward"]["backward_s"] for t in runs["trick"])
    bwd_trick = min(t["trick"]["backward_s"] for t in runs["trick"])
    figures = {
        "model": name, "params": n_params, "device": str(device), "dtype": args.dtype, "autocast": args.autocast,
        "n_samples": cal.n_samples, "tokens": cal.n_tokens, "batch_size": args.batch_size,
        "forward": fwd, "hessian": hes, "trick": trick, "per_sample_backward": naive,
        "hessian_over_forward": hes["tokens_per_second"] / fwd["tokens_per_second"],
        "trick_speedup_total": naive["total_s"] / trick["total_s"],
        "trick_speedup_backward": bwd_naive / bwd_trick,
        "max_abs_diff_A": max(t["max_abs_diff_A"] for t in runs["trick"]),
        "max_abs_A": runs["trick"][0]["max_abs_A"],
    }
    mem = hes.get("peak_memory_gib")
    print(f"forward      {fwd['tokens_per_second']:10.0f} tokens/s" +
          (f", peak {fwd['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in fwd else ""))
    print(f"hessian      {hes['tokens_per_second']:10.0f} tokens/s" + (f", peak {mem:.1f} GiB" if mem else "") +
          f", padding {hes.get('padding_fraction', 0):.1%}")
    print(f"Hessian / forward token rate: {figures['hessian_over_forward']:.2f}  (target >= 0.4)")
    print(f"per-sample trick vs one backward per sample at batch {args.batch_size}: "
          f"{figures['trick_speedup_total']:.2f}x whole step, {figures['trick_speedup_backward']:.2f}x backward "
          f"(target >= 8x); A agree to {figures['max_abs_diff_A']:.1e} (max |A| {figures['max_abs_A']:.1e})")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    ok = figures["hessian_over_forward"] >= 0.4 and figures["trick_speedup_backward"] >= 8
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
