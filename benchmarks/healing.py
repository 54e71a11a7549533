"""Peak memory of one distillation step: plain loss formula vs chunked, at real vocabulary sizes.

    PYTHONPATH=. python benchmarks/healing.py --vocab 128256 262144 --batch 2 --seq 512

A tiny Llama (2 layers, hidden 64) with a real-size vocabulary: the logits dominate memory, as
they do for the loss of a large model. Each variant runs in a fresh process (peak resident memory,
`ru_maxrss`, is per process); the step is student forward + loss + backward against fixed teacher
logits. The script prints the peak above the pre-step baseline for each variant, their ratio, and
the largest differences of the loss and of every parameter gradient from the plain formula.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# plain: the textbook formula on full logits; chunked: the same formula on chunks of tokens of the
# full logits; head: the LM head inside the chunked loss (what `heal` uses when the model allows).
VARIANTS = ("plain", "chunked", "head")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_step(vocab: int, batch: int, seq: int, variant: str, chunk: int, out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cboprune.heal.loss import DistillationLoss, head_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=seq, tie_word_embeddings=False))
    ids = torch.randint(0, vocab, (batch, seq))
    teacher = 4 * torch.randn(batch, seq, vocab)  # [B, S, V] fp32, as a teacher's logits would be
    mask = torch.ones(batch, seq)
    loss_fn = DistillationLoss(temperature=1.0, kd_weight=1.0, chunk_tokens=None if variant == "plain" else chunk)
    baseline = _rss_mib()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if variant == "head":  # the LM head inside the chunked loss: no full student logits at all
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        loss = head_loss(loss_fn, hidden, model.get_output_embeddings(), teacher, ids, mask)
    else:
        loss = loss_fn(model(input_ids=ids).logits, teacher, ids, mask)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grads = {n: p.grad for n, p in model.named_parameters()}
    torch.save({"loss": loss.detach(), "grads": grads}, out)
    print(json.dumps({"baseline_mib": round(baseline), "peak_above_baseline_mib": round(peak - max(baseline, before)),
                      "peak_mib": round(peak), "logits_mib": round(teacher.numel() * 4 / 2**20)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 262144])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=128, help="tokens per chunk of the chunked loss")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        one_step(args.vocab[0], args.batch, args.seq, args._child[0], args.chunk, args._child[1])
        return
    for vocab in args.vocab:
        rows, results = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in VARIANTS:
                path = str(Path(tmp) / f"{name}.pt")
                cmd = [sys.executable, __file__, "--vocab", str(vocab), "--batch", str(args.batch), "--seq",
                       str(args.seq), "--chunk", str(args.chunk), "--_child", name, path]
                rows[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True)
                                        .stdout.strip().splitlines()[-1])
                results[name] = torch.load(path, weights_only=True)  # our own file, tensors only
        a = results["plain"]
        line = {"vocab": vocab, "batch": args.batch, "seq": args.seq, "chunk_tokens": args.chunk,
                "loss": float(a["loss"]), "max_grad": max(float(g.abs().max()) for g in a["grads"].values())}
        for name in VARIANTS:
            b = results[name]
            ratio = rows["plain"]["peak_above_baseline_mib"] / max(1, rows[name]["peak_above_baseline_mib"])
            line[name] = {**rows[name], "peak_ratio_vs_plain": round(ratio, 2),
                          "max_loss_diff": float((a["loss"] - b["loss"]).abs()),
                          "max_grad_diff": max(float((a["grads"][n] - b["grads"][n]).abs().max()) for n in a["grads"])}
        print(json.dumps(line), flush=True)

if __name__ == "__main__":
    main()
