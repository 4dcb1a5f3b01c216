"""Decode steps on int8 activations (load(decode_dtype="int8"), csrc/cpu/decode_step.h).

The blocks' Linears then follow the int8 prompt GEMM's contract, whose result for a row depends on
that row only (csrc/cpu/qlinear_i8gemv.h: the GEMV for few rows and the GEMM for more give the same
bits). So a sequence's hidden state after every block is the same bits whether it is decoded alone
or beside others, with any number of threads: checked here on every ISA, for batches below and
above the GEMV's row limit. The head stays fp32 (as the prompt pass's), so its logits may differ
in the last bits between kernels; the greedy tokens must not.

Against fp32 decode: the same stated bound as the int8 prompt pass (tests/test_prefill_int8.py),
3 % of the largest |logit|, on the trained default model, greedy tokens equal where the fp32
margin exceeds twice that.
"""

from __future__ import annotations

import pytest
import torch

import codegen_q
from codegen_q import default_model
from codegen_q.format.config import CodeGenConfig
from codegen_q.generation.load import load
from codegen_q.kernels import native as _native
from codegen_q.model.codegen import CodeGenModel
from codegen_q.model.kv_cache import PagedKVCache
from codegen_q.quantization.convert import quantize_checkpoint
from model_support import converted_weights, reference_model

BOUND = 0.03
OTHER = {8: 4, 4: 8}  # the lm_head's scheme beside the blocks'
GEMV_MAX_M = {isa: c["int8_gemv_max_m"] for isa, c in _native.cpu().kernel_constants()["isa"].items()}


def int8_decode_model(bits: int, seed: int) -> CodeGenModel:
    hf = reference_model("hd64", n_layer=2, seed=seed)  # d = 256: whole 128-element chunks
    return CodeGenModel(CodeGenConfig.from_dict(hf.config.to_dict()),
                        converted_weights(hf, bits, lm_head_bits=OTHER[bits]),
                        prefill_dtype=torch.int8, decode_dtype=torch.int8)


def decode(model: CodeGenModel, prompts: list[list[int]], steps: int, min_bytes: int):
    """Prompts, then greedy fused steps: (h per step [steps, S, d], logits per step, tokens fed)."""
    model.fused.native.min_block_bytes_per_job = min_bytes
    cache = PagedKVCache.for_tokens(model.config, 64 * len(prompts), block_size=16)
    seqs = [cache.add_sequence() for _ in prompts]
    logits = model.forward([torch.tensor(p) for p in prompts], cache, seqs)
    tokens = [int(lg[-1].argmax()) for lg in logits]
    hs, all_logits, fed = [], [], []
    for _ in range(steps):
        fed.append(tokens)
        h, lg, _ = model._fused_step(cache, seqs, tokens)
        hs.append(h.clone())
        all_logits.append(lg.clone())
        tokens = [int(row.argmax()) for row in lg]
    return torch.stack(hs), torch.stack(all_logits), fed


@pytest.mark.parametrize("jobs", ["one", "two"])
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
def test_a_sequence_decodes_the_same_bits_alone_and_in_a_batch(cpu_isa, bits, jobs):
    model = int8_decode_model(bits, seed=5)
    assert model.fused is not None and model.fused.native.int8_activations
    codegen_q.set_num_threads(2)
    min_bytes = 1 if jobs == "two" else 1 << 40
    # 11 sequences: above the AVX2 GEMV's row limit, so the batch takes the GEMM and each sequence
    # alone the GEMV; 3: the GEMV both ways.
    prompts = [[(5 * i + j) % 90 for j in range(2 + i % 6)] for i in range(11)]
    assert len(prompts) > GEMV_MAX_M.get(cpu_isa, 0)
    for batch in (prompts, prompts[:3]):
        h_batch, logits_batch, fed_batch = decode(model, batch, 6, min_bytes)
        for s, prompt in enumerate(batch):
            h_alone, logits_alone, fed_alone = decode(model, [prompt], 6, min_bytes)
            assert [step[0] for step in fed_alone] == [step[s] for step in fed_batch], f"sequence {s}"
            assert torch.equal(h_alone[:, 0], h_batch[:, s]), f"sequence {s}: hidden state"
            scale = float(logits_alone.abs().max())
            assert (logits_alone[:, 0] - logits_batch[:, s]).abs().max() <= 1e-5 * scale, f"sequence {s}: logits"


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory):
    int4 = str(tmp_path_factory.mktemp("int4") / "model")
    quantize_checkpoint(default_model.HUB_DIR, int4, bits=4, group_size=128, progress=False)
    return {"int8": default_model.path(), "int4": int4}


@pytest.mark.filterwarnings("ignore:decode_dtype='int8' asked for")  # the scalar build pads (tested below)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_int8_decode_stays_within_the_stated_bound_of_fp32_decode(cpu_isa, trained_models, scheme):
    path = trained_models[scheme]
    fp32 = load(path, decode_dtype="float32").model
    int8 = load(path, decode_dtype="int8").model
    assert int8.fused.native.int8_activations and not fp32.fused.native.int8_activations
    tokenizer = load(path).tokenizer
    prompts = [tokenizer.encode(p) for p in ("def parse_args(argv):\n    ", "class Queue:\n    def __init__(self")]
    _, want, fed = decode(fp32, prompts, 16, 1 << 20)
    # Feed int8 decode the fp32 run's tokens, so both see the same sequences throughout.
    cache = PagedKVCache.for_tokens(int8.config, 128, block_size=16)
    seqs = [cache.add_sequence() for _ in prompts]
    int8.forward([torch.tensor(p) for p in prompts], cache, seqs)
    got = torch.stack([int8._fused_step(cache, seqs, tokens)[1].clone() for tokens in fed])
    scale = float(want.abs().max())
    assert (got - want).abs().max() <= BOUND * scale
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * BOUND * scale
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    assert clear.float().mean() > 0.25  # the comparison is not vacuous
    assert not torch.equal(got, want)  # and int8 activations really ran


def test_decode_dtype_is_checked_at_load(tmp_path):
    with pytest.raises(ValueError, match="decode_dtype"):
        load(default_model.path(), decode_dtype="bfloat16")
    with pytest.raises(ValueError, match="CPU option" if torch.cuda.is_available() else "no CUDA device"):
        load(default_model.path(), device="cuda", decode_dtype="int8")
    with pytest.raises(ValueError, match="needs a quantized model"):
        load(default_model.HUB_DIR, decode_dtype="int8")
    assert load(default_model.path(), decode_dtype="auto").model.decode_dtype is None


def test_int8_decode_warns_where_the_cpu_has_no_int8_gemv(cpu_isa):
    """Without the GEMV every decode row is padded to the GEMM's tile: slower, so the user is told."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(default_model.path(), decode_dtype="int8")
    padded = [w for w in caught if "no int8-activation GEMV" in str(w.message)]
    assert len(padded) == (0 if GEMV_MAX_M.get(cpu_isa, 0) >= 1 else 1)
