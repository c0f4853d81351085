"""Run the reference implementations (transformers, llama.cpp) and condense their logits into goldens.

A golden keeps, per position, the reference's top-k logits and their token ids plus the standard deviation
of the full logit row (the scale that makes tolerances meaningful), for teacher-forced sequences and for a
greedy continuation of a prompt. Only tools/make_fixtures.py imports this; tests read the .npz files.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # the BitNet quantisers are torch.compile'd

TOP_K = 16
LogitsFn = Callable[[list[int]], np.ndarray]  # token ids -> float32 [len, vocab], position by position


def summarise(logits: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k ids (best first, ties by lower id), their logits, and the std of each full row."""
    logits = np.asarray(logits, dtype=np.float32)
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return order.astype(np.int32), np.take_along_axis(logits, order, axis=-1), logits.std(axis=-1)


def golden(
    logits_fn: LogitsFn,
    sequences: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]],
    n_new: int,
    meta: dict[str, object],
) -> dict[str, np.ndarray]:
    """Teacher-forced summaries of `sequences`, then greedy continuations of `prompts` (n_new tokens each).

    The greedy step i records the logits that chose continuation token i, so a test can teacher-force the
    reference continuation through a decode loop and know where the reference itself saw a near-tie.
    """
    tf = [summarise(logits_fn(list(seq))) for seq in sequences]
    greedy_tokens, greedy = [], []
    for prompt in prompts:
        ids = list(prompt)
        rows = []
        for _ in range(n_new):
            row = logits_fn(ids)[-1]
            rows.append(row)
            ids.append(int(np.argmax(row)))
        greedy_tokens.append(ids[len(prompt) :])
        greedy.append(summarise(np.stack(rows)))
    return {
        "tokens": np.asarray(sequences, dtype=np.int32),
        "top_ids": np.stack([t[0] for t in tf]),
        "top_logits": np.stack([t[1] for t in tf]),
        "std": np.stack([t[2] for t in tf]),
        "greedy_prompts": np.asarray(prompts, dtype=np.int32),
        "greedy_tokens": np.asarray(greedy_tokens, dtype=np.int32),
        "greedy_top_ids": np.stack([g[0] for g in greedy]),
        "greedy_top_logits": np.stack([g[1] for g in greedy]),
        "greedy_std": np.stack([g[2] for g in greedy]),
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }


# ----------------------------------------------------------------------------------------------------------
# transformers


def _all_float32(model) -> None:
    """Quantised BitNet models refuse .float() and keep bf16 norms: cast every float tensor in place."""
    import torch

    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor.data = tensor.data.float()


def transformers_from_folder(folder: pathlib.Path, config_overrides: dict[str, object] | None = None):
    """BitNetForCausalLM from a checkpoint folder, with its BitNet quantisation active, in float32."""
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM

    torch.set_num_threads(2)
    config = BitNetConfig.from_pretrained(str(folder), **(config_overrides or {}))
    model = BitNetForCausalLM.from_pretrained(str(folder), config=config, dtype=torch.float32)
    _all_float32(model)
    model.eval()
    _check_quantised(model)
    return model


def _check_quantised(model) -> None:
    """Refuse to produce goldens from a model whose projections are not the BitNet quantised linears."""
    from transformers.integrations.bitnet import AutoBitLinear

    proj = model.model.layers[0].self_attn.q_proj
    if not isinstance(proj, AutoBitLinear):
        raise RuntimeError(f"q_proj is {type(proj).__name__}, not AutoBitLinear: quantisation is off")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the embedding")


def quantisation_margins(model, ids: list[int]) -> np.ndarray:
    """Per position, how far (in int8 steps) the activation closest to a rounding boundary sits from it, in
    transformers' own forward: min over every value BitNet quantises of |frac(x·s) - 0.5|.

    Where this is tiny, the float noise of any other implementation can flip that rounding, and a flip
    cascades through later layers and positions (about 1e-2 std on the logits): such spots make poor goldens.
    """
    import torch
    from transformers.integrations.bitnet import AutoBitLinear

    per_call: list[np.ndarray] = []

    def hook(module, args):
        x = args[0][0].detach().float()
        scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
        v = (x * scale).numpy()
        per_call.append(np.abs(v - np.floor(v) - 0.5).min(axis=-1))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, AutoBitLinear)]
    try:
        with torch.no_grad():
            model(torch.tensor([ids], dtype=torch.long), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return np.min(np.stack(per_call), axis=0).astype(np.float32)


def transformers_unquantised(floats: dict[str, np.ndarray], config_dict: dict[str, object]):
    """The same architecture with plain float linears holding codes·scale: no activation quantisation."""
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM

    torch.set_num_threads(2)
    config_dict = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    config = BitNetConfig(**config_dict)
    model = BitNetForCausalLM(config).float().eval()
    state = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in floats.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the embedding")
    return model


def transformers_logits_fn(model) -> LogitsFn:
    import torch

    def run(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.tensor([ids], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    return run


# ----------------------------------------------------------------------------------------------------------
# llama.cpp


def llama_cpp_logits_fn(path: pathlib.Path, n_ctx: int = 64, n_threads: int = 2) -> tuple[LogitsFn, object]:
    """llama-cpp-python with logits for every position and an f32 KV cache (f16 K/V adds ~0.03 error)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32
        type_v=0,
        flash_attn=False,
        verbose=False,
    )
    if llm.n_vocab() <= 0:
        raise RuntimeError(f"llama.cpp loaded no vocabulary from {path}")

    def run(ids: list[int]) -> np.ndarray:
        llm.reset()  # the next eval drops the whole KV cache
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return run, llm
