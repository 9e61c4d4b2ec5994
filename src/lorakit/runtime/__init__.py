"""Runtime foundations: crash-safe files (`atomic`), devices and dtypes (`devices`), torch.distributed
(`distributed`), training checkpoints (`checkpoint`), Ctrl-C at a step boundary (`interrupt`) and the cache
folder (`cache`). Nothing here imports a lorakit module above it."""
