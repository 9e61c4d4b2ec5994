"""Deploy a trained run outside lorakit: GGUF files for llama.cpp and Ollama (`lorakit export`)."""
