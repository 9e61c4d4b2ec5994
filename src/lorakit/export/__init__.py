"""Exports of a trained adapter: merged transformers checkpoints (shard-streamed)."""

from lorakit.export.merge_stream import merge_adapter_streaming

__all__ = ["merge_adapter_streaming"]
