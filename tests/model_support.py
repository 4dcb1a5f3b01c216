"""Tiny random transformers CodeGen models (the reference the model tests compare with) and
codegen-q models of the same weights, shared by the model, generation, fused-decode and engine tests.

Three shapes mirror the real head dims (64 for 350M, 80 for 2B, 256 for 6B/16B), each with
rotary_dim < head_dim so the partial, interleaved rotary is exercised.
"""

from __future__ import annotations

import torch
import transformers

from codegen_q.format.schema import qkv_head_major_permutation
from codegen_q.format.config import CodeGenConfig
from codegen_q.model.kv_cache import PagedKVCache
from codegen_q.model.codegen import CodeGenModel
from codegen_q.quantization.rtn import quantize_weight
from codegen_q.testing.tokenizer_files import write_tokenizer_files
from codegen_q.generation.tokenizer import CodeGenTokenizer

transformers.logging.set_verbosity_error()

SHAPES = {"hd64": (4, 64, 32), "hd80": (4, 80, 64), "hd256": (4, 256, 64)}  # n_head, head_dim, rotary_dim
VOCAB = 512
LINEARS = ("attn.qkv_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out")
MODEL_VOCAB = 640  # reference_with_tokenizer's rows: more than the tokenizer has ids, the rest padding
PROMPTS = ["def add(a, b):\n    return", "class Stack:\n", "import os\n\n\ndef main():\n        x = 1"]


def reference_model(shape: str, n_layer: int = 2, seed: int = 0) -> transformers.CodeGenForCausalLM:
    n_head, head_dim, rotary_dim = SHAPES[shape]
    torch.manual_seed(seed)
    cfg = transformers.CodeGenConfig(vocab_size=VOCAB, n_positions=256, n_embd=n_head * head_dim, n_layer=n_layer,
                                     n_head=n_head, rotary_dim=rotary_dim, bos_token_id=0, eos_token_id=0)
    model = transformers.CodeGenForCausalLM(cfg).eval()
    with torch.no_grad():  # spread the logits so greedy decoding has no near-ties
        model.lm_head.weight.mul_(8.0)
    return model


def reference_with_tokenizer(directory, seed: int = 0):
    """The test tokenizer (written to `directory`) and a random transformers CodeGen whose 640
    vocabulary rows cover its ids, the rest padding as on the hub; logits spread (no near-ties)
    and EOS suppressed, so random completions run to their length."""
    write_tokenizer_files(str(directory))
    tokenizer = CodeGenTokenizer.from_dir(directory)
    torch.manual_seed(seed)
    cfg = transformers.CodeGenConfig(vocab_size=MODEL_VOCAB, n_positions=128, n_embd=128, n_layer=2, n_head=4,
                                     rotary_dim=16, bos_token_id=tokenizer.eos_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
    hf = transformers.CodeGenForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
        hf.lm_head.bias[tokenizer.eos_token_id] = -1e4  # keep random completions from ending at once
    return hf, tokenizer


def converted_weights(hf: transformers.CodeGenForCausalLM, bits: int | None = None, group_size: int = 32,
                      lm_head_bits: int | None = None) -> dict:
    """The hub state dict in codegen-q's layout: qkv rows head-major, block Linears (`bits`) and
    lm_head (`lm_head_bits`) optionally quantized."""
    cfg = hf.config
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    perm = qkv_head_major_permutation(cfg.n_embd, cfg.n_head)
    for i in range(cfg.n_layer):
        key = f"transformer.h.{i}.attn.qkv_proj.weight"
        sd[key] = sd[key][perm]
        if bits is not None:
            for name in LINEARS:
                w = sd.pop(f"transformer.h.{i}.{name}.weight")
                kwargs = dict(bits=8) if bits == 8 else dict(bits=4, group_size=group_size)
                sd[f"transformer.h.{i}.{name}"] = quantize_weight(w, **kwargs)
    if lm_head_bits is not None:
        w = sd.pop("lm_head.weight")
        sd["lm_head"] = quantize_weight(w, bits=8) if lm_head_bits == 8 else quantize_weight(w, bits=4, group_size=32)
    return sd


def our_model(hf, bits: int | None = None, lm_head_bits: int | None = None) -> CodeGenModel:
    return CodeGenModel(CodeGenConfig.from_dict(hf.config.to_dict()), converted_weights(hf, bits,
                                                                                        lm_head_bits=lm_head_bits))


def fp32_tolerance(ref: torch.Tensor) -> float:
    # Both implementations compute in fp32 with different summation orders (fused qkv split,
    # einsum vs matmul, our qlinear kernels). Logits are O(1); two layers of O(d)-term fp32 dot
    # products and softmaxes accumulate a few hundred ulps at most: 1e-5 relative to the largest
    # logit is ~ 100 ulps of it and 10x above what we observe (~1e-6).
    return 1e-5 * float(ref.abs().max())


def run_prompt_then_steps(model, prompts, steps, fused: bool, min_bytes: int | None = None, kv_dtype=torch.float32,
         cache_tokens: int = 256):
    """Prompts, then `steps` greedy single-token steps; (stacked last logits per step, tokens fed).
    fused=False takes the op-by-op path; min_bytes sets the fused step's work per thread."""
    saved = model.fused
    if not fused:
        model.fused = None
    elif min_bytes is not None:
        model.fused.native.min_block_bytes_per_job = min_bytes
    try:
        cache = PagedKVCache.for_tokens(model.config, cache_tokens, block_size=16, dtype=kv_dtype)
        seqs = [cache.add_sequence() for _ in prompts]
        logits = model.forward([torch.tensor(p) for p in prompts], cache, seqs)
        history, tokens = [torch.stack([l[-1] for l in logits])], [int(l[-1].argmax()) for l in logits]
        fed = []
        for _ in range(steps):
            fed.append(tokens)
            logits = model.forward([torch.tensor([t]) for t in tokens], cache, seqs)
            history.append(torch.stack([l[-1] for l in logits]))
            tokens = [int(l[-1].argmax()) for l in logits]
        return torch.stack(history), fed
    finally:
        model.fused = saved
