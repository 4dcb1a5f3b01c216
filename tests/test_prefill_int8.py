"""A whole model's prompt pass with int8 activations (load(prefill_dtype="int8")) against the same
weights with fp32 prompt GEMMs, on the shipped trained model (realistic activations, including
its large channels) as int8 and as int4, on every ISA this CPU runs.

Stated bound: every logit of every prompt position within 3 % of the largest |logit| of the fp32
pass. (One activation is rounded by at most 1/254 of its 128-element chunk's largest magnitude,
about 0.4 % of a typical chunk's norm; the layers compound it. The trained model measures ~0.75 %.)
Greedy continuations agree up to the first step whose fp32 top-2 margin is within twice that
bound, and the prompt's predictions agree wherever the margin allows.
"""

from __future__ import annotations

import pytest
import torch

import codegen_q
from codegen_q import default_model
from codegen_q.quantization.convert import quantize_checkpoint
from codegen_q.generation.load import load

BOUND = 0.03
PROMPT_TOKENS = 300  # a few tiles of rows on every ISA
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    int4 = str(tmp_path_factory.mktemp("int4") / "model")
    quantize_checkpoint(default_model.HUB_DIR, int4, bits=4, group_size=128, progress=False)
    return {"int8": default_model.path(), "int4": int4}


@pytest.fixture(scope="module")
def held_out_ids():
    with open(default_model.HELD_OUT_SAMPLE, encoding="utf-8") as f:
        text = f.read()
    return load(default_model.path()).tokenizer.encode(text)


@pytest.fixture(scope="module")
def prompt_ids(held_out_ids):
    return held_out_ids[:PROMPT_TOKENS]


def all_logits(loaded, ids: list[int]) -> torch.Tensor:
    cache = loaded.model.new_cache(len(ids) + 16)
    seq = cache.add_sequence()
    return loaded.model.forward([torch.tensor(ids)], cache, [seq], last_only=False)[0]


def greedy_with_margins(loaded, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and, at each step, the top-2 margin and scale that decided it."""
    model, vocab = loaded.model, min(len(loaded.tokenizer), loaded.config.vocab_size)
    cache = model.new_cache(len(ids) + n + 16)
    seq, feed, out, margins = cache.add_sequence(), ids, [], []
    for _ in range(n):
        logits = model.forward([torch.tensor(feed)], cache, [seq])[0][-1, :vocab]
        top = logits.topk(2).values
        margins.append(float(top[0] - top[1]) / float(logits.abs().max()))
        out.append(int(logits.argmax()))
        feed = [out[-1]]
    return out, margins


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_prompt_logits_within_the_bound(cpu_isa, models, prompt_ids, scheme):
    fp32 = all_logits(load(models[scheme], prefill_dtype="float32"), prompt_ids)
    int8 = all_logits(load(models[scheme], prefill_dtype="int8"), prompt_ids)
    scale = float(fp32.abs().max())
    err = float((int8 - fp32).abs().max())
    assert err <= BOUND * scale, f"{cpu_isa} {scheme}: max |logit difference| {err:.4f} > {BOUND:.0%} of {scale:.3f}"
    assert err > 0, "int8 prompt activations left the logits unchanged: the int8 path did not run"
    # where fp32's top-2 margin exceeds twice the bound, the predicted token is the same
    top = fp32.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 2 * BOUND * scale
    assert clear.sum() > 0
    assert torch.equal(fp32.argmax(-1)[clear], int8.argmax(-1)[clear])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_greedy_continuation_matches_where_the_margin_allows(models, held_out_ids, scheme):
    fp32, int8 = load(models[scheme], prefill_dtype="float32"), load(models[scheme], prefill_dtype="int8")
    confident = 0
    for cut in range(100, 480, 10):  # prompts ending at many points (context: 512)
        ref, margins = greedy_with_margins(fp32, held_out_ids[:cut], NEW_TOKENS)
        got, _ = greedy_with_margins(int8, held_out_ids[:cut], NEW_TOKENS)
        sure = next((i for i, m in enumerate(margins) if m <= 2 * BOUND), len(margins))
        assert got[:sure] == ref[:sure], f"{scheme}, prompt of {cut}: continuations differ in the first {sure} steps"
        confident += sure
    assert confident >= 4, f"test setup: only {confident} confident steps over all prompts"


def test_int8_is_the_default_for_quantized_models_on_the_cpu(models, prompt_ids):
    default = all_logits(load(models["int8"]), prompt_ids)
    assert torch.equal(default, all_logits(load(models["int8"], prefill_dtype="int8"), prompt_ids))
    assert load(default_model.HUB_DIR).model.prefill_dtype is None  # a float model keeps fp32 prompts


def test_unknown_prefill_dtype_is_refused(models):
    with pytest.raises(ValueError, match="prefill_dtype"):
        load(models["int8"], prefill_dtype="int4")


def test_refused_on_a_gpu(models):
    if not codegen_q.backends()["cuda"]["devices"]:
        pytest.skip("no CUDA device to refuse int8 prompt activations on")
    with pytest.raises(ValueError, match="CPU option"):
        load(models["int8"], device="cuda", prefill_dtype="int8")
