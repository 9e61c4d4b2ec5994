"""A llama.cpp runtime for the export tests: ik_llama.cpp's libllama (PyPI wheel `ik-llama-cpp-python`, no compiler).

Its Python class only samples, so this drives the C API through the wheel's ctypes bindings: logits at
every position of a prompt, greedy decoding, and a GGUF LoRA applied with `llama_lora_adapter_set`.

Context settings, and why:
  * type_k = F32: the default f16 K cache alone adds ~1e-3 relative error to the logits; an f32 V cache
    needs flash attention, whose CPU kernel aborts without AVX-VNNI, so V stays f16 (the tolerance covers it).
  * fused_up_gate = False: ik_llama.cpp's fused FFN up/gate kernel skips LoRA adapters on ffn_up and
    ffn_gate (src/llama-build-context.cpp, llm_build_ffn); mainline llama.cpp has no such path.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch
from ik_llama_cpp import _ctypes_api as C
from ik_llama_cpp._internals import IkModel, make_batch_range

GGML_TYPE_F32 = 0
_lib = C._lib
_lib.llama_lora_adapter_init.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.llama_lora_adapter_init.restype = ctypes.c_void_p
_lib.llama_lora_adapter_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]
_lib.llama_lora_adapter_set.restype = ctypes.c_int32
for _name in ("llama_token_eos", "llama_token_eot", "llama_token_bos"):
    getattr(_lib, _name).argtypes = [ctypes.c_void_p]
    getattr(_lib, _name).restype = ctypes.c_int32


class LlamaCpp:
    """One GGUF model (optionally with a GGUF LoRA) loaded by libllama on the CPU."""

    def __init__(self, path: Path, lora: Path | None = None, n_ctx: int = 128):
        self.model = IkModel(str(path))
        params = C.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx
        params.n_threads = params.n_threads_batch = 2
        params.flash_attn = False
        params.type_k = GGML_TYPE_F32
        params.fused_up_gate = False
        self.ctx = C.llama_init_from_model(self.model.model, params)
        assert self.ctx, f"libllama could not create a context for {path}"
        self.lora = None
        if lora is not None:
            self.lora = _lib.llama_lora_adapter_init(self.model.model, str(lora).encode())
            assert self.lora, f"libllama rejected the LoRA {lora} (see its log above)"
            assert _lib.llama_lora_adapter_set(self.ctx, self.lora, 1.0) == 0

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.model.tokenize(text, add_bos=add_bos, special=True)

    def special(self, which: str) -> int:
        return getattr(_lib, f"llama_token_{which}")(self.model.model)

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_token_is_eog(self.model.model, token))

    def logits(self, ids: list[int]) -> torch.Tensor:
        """(T, vocab) float32 logits for every position of `ids`, from an empty cache."""
        C.llama_kv_cache_clear(self.ctx)
        self._decode(ids, 0, all_logits=True)
        n_vocab = self.model.n_vocab
        rows = [np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, i), shape=(n_vocab,)).copy() for i in range(len(ids))]
        return torch.from_numpy(np.stack(rows))

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """n greedy tokens after `ids` (argmax of the logits, no sampler)."""
        C.llama_kv_cache_clear(self.ctx)
        self._decode(ids, 0, all_logits=False)
        out, pos = [], len(ids)
        for _ in range(n):
            logits = np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, -1), shape=(self.model.n_vocab,))
            out.append(int(logits.argmax()))
            self._decode(out[-1:], pos, all_logits=False)
            pos += 1
        return out

    def _decode(self, ids: list[int], pos: int, all_logits: bool) -> None:
        batch = make_batch_range(ids, pos_start=pos, logits_last=True)
        for i in range(len(ids) if all_logits else 0):
            batch.logits[i] = 1
        try:
            assert C.llama_decode(self.ctx, batch) == 0, "llama_decode failed"
        finally:
            C.llama_batch_free(batch)

    def close(self) -> None:
        # NOTE: the LoRA is not freed here: libllama frees adapters with their model (freeing twice crashes).
        if self.ctx:
            C.llama_free(self.ctx)
            self.ctx = None
        self.model.close()
