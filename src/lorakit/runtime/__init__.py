"""Runtime foundations: crash-safe files (`atomic`), devices and dtypes (`devices`), torch.distributed
(`distributed`), training checkpoints (`checkpoint`) and Ctrl-C at a step boundary (`interrupt`). Nothing
here imports a lorakit module above it."""
