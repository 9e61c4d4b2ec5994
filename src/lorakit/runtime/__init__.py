"""Runtime foundations: crash-safe files (`atomic`), devices and dtypes (`devices`), torch.distributed
(`distributed`) and training checkpoints (`checkpoint`). Nothing here imports a lorakit module above it."""
