"""GGUF in, GGUF out: remove blocks inside a GGUF file with its quantization kept bit for bit
(`prune`), export a Hugging Face checkpoint to GGUF (`export`), and run / time GGUF files in
llama.cpp through llama-cpp-python (`runner`, `bench`). See docs/gguf.md."""
