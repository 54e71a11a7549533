"""GGUF in, GGUF out: remove blocks inside a GGUF file with its quantization kept bit for bit
(`prune`), export a Hugging Face checkpoint to GGUF (`export`), and run / time GGUF files in
llama.cpp through llama-cpp-python (`runner`, `bench`). See docs/gguf.md."""

from __future__ import annotations

#: tensor types `cboprune export` writes (1-D tensors stay f32); here so that the parser stays light
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
