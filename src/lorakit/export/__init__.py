"""Deploy a trained run outside lorakit: GGUF files for llama.cpp and Ollama (`lorakit export`), and merged
transformers checkpoints written shard by shard (`merge_adapter_streaming`)."""
