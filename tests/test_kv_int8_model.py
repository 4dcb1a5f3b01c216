"""A model on an int8 KV cache (load(kv_dtype="int8")): its prompt paths read what the paged kernel
reads, the fused decode step computes the op-by-op path's function, the engine and the prefix
cache keep their guarantees, and the shipped model's logits and greedy text stay close to the fp32
cache's. Kernel-level properties (the rule, the derived attention bound) are test_kv_int8.py's."""

from __future__ import annotations

import warnings

import pytest
import torch

import codegen_q
from codegen_q import default_model
from codegen_q.model import codegen as model_module
from codegen_q.format.config import CodeGenConfig
from codegen_q.generation.engine import Engine
from codegen_q.model.memory_plan import kv_cache_bytes
from codegen_q.model.codegen import CodeGenModel
from engine_support import drive, ids, reference, solo_greedy, tok  # noqa: F401 (fixtures)
from model_support import (VOCAB, converted_weights, fp32_tolerance, our_model, reference_model,
                           run_prompt_then_steps)

# Stated bound on the shipped model's logits, int8 against fp32 KV, teacher-forced on held-out
# code: 1 % of the largest logit's magnitude. Not derived through the network: each stored
# element is off by at most 1/254 of its head row's largest (0.39 %), and four blocks of
# attention, MLP and residuals turn that into 0.46 % of the largest logit here (fp16 KV: 0.017 %);
# the bound leaves 2x for other CPUs' summation orders.
LOGIT_BOUND = 0.01


def test_a_fresh_prompts_torch_attention_reads_the_values_the_paged_kernel_reads(monkeypatch):
    # One block: its K/V come from the embeddings alone, so both paths store the same codes and
    # differ only by fp32 rounding. Attending over the exact K/V instead would differ by the int8
    # step (~1e-2 of the logits here), 1000x this tolerance.
    hf = reference_model("hd64", n_layer=1, seed=3)
    model = CodeGenModel(CodeGenConfig.from_dict(hf.config.to_dict()), converted_weights(hf, 8), kv_dtype=torch.int8)
    g = torch.Generator().manual_seed(4)
    long, cached, more = (torch.randint(0, VOCAB, (n,), generator=g) for n in (150, 20, 10))
    calls, real = [], model_module.causal_self_attention
    monkeypatch.setattr(model_module, "causal_self_attention", lambda *a: calls.append(1) or real(*a))
    per_path = {}
    for min_tokens in (model_module.FUSED_PREFILL_MIN_TOKENS, 10**6):
        monkeypatch.setattr(model_module, "FUSED_PREFILL_MIN_TOKENS", min_tokens)
        cache = model.new_cache(256)
        a, b = cache.add_sequence(), cache.add_sequence()
        model.forward([cached], cache, [b])
        # A fresh long prompt beside one continuing its cached tokens: torch for one, the kernel for the other.
        per_path[min_tokens] = model.forward([long, more], cache, [a, b], last_only=False)
    assert len(calls) == 1
    (fused_a, fused_b), (paged_a, paged_b) = per_path.values()
    assert (fused_a - paged_a).abs().max() <= fp32_tolerance(paged_a)
    assert torch.equal(fused_b, paged_b)


def test_the_fused_decode_step_computes_the_op_by_op_function_on_int8_kv(cpu_isa):
    model = our_model(reference_model("hd80", n_layer=3, seed=7), 4, lm_head_bits=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        codegen_q.set_num_threads(2)
    prompts = [[5, 9, 2, 7, 1, 3, 3, 8, 4, 4, 6, 1, 0, 2, 9], [11], list(range(20, 37))]
    got, fed_got = run_prompt_then_steps(model, prompts, 20, fused=True, min_bytes=1, kv_dtype=torch.int8)
    want, fed_want = run_prompt_then_steps(model, prompts, 20, fused=False, kv_dtype=torch.int8)
    assert fed_got == fed_want  # greedy tokens identical
    # Same arithmetic up to fp32 summation order, except that a K/V element whose two fp32 versions
    # straddle a rounding boundary of the int8 grid is stored one step (<= 1/127 of its head row's
    # largest) apart; a few such elements move the logits by at most that fraction of their scale.
    assert (got - want).abs().max() <= want.abs().max() / 127


@pytest.fixture(scope="module")
def int4_int8kv_model(reference):
    hf, _ = reference
    return CodeGenModel(CodeGenConfig.from_dict(hf.config.to_dict()), converted_weights(hf, 4, lm_head_bits=8),
                        kv_dtype=torch.int8)


def test_the_engine_on_int8_kv_gives_each_request_its_solo_tokens_and_prefix_hits_change_nothing(
        int4_int8kv_model, tok):
    model = int4_int8kv_model
    assert model.fused is not None
    engine = Engine(model, tok, kv_tokens=1024, max_batch=4)
    assert engine.cache.k.dtype == torch.int8 and engine.cache.k_scales is not None
    adds = {0: [(ids(tok, 0), None, 20)], 3: [(ids(tok, 1), None, 12)], 5: [(ids(tok, 2), None, 9)]}
    runs = drive(engine, adds)
    for rid, n in enumerate((20, 12, 9)):
        assert runs[rid]["tokens"] == solo_greedy(model, tok, ids(tok, rid), n), f"request {rid}"
    # The same prompt again starts on its cached blocks (codes and scales shared) and continues alike.
    prompt = ids(tok, 0) * 4
    cold = drive_one(engine, prompt, 16)
    hits = engine.cached_prompt_tokens
    warm = drive_one(engine, prompt, 16)
    assert engine.cached_prompt_tokens > hits
    assert warm == cold == solo_greedy(model, tok, prompt, 16)
    assert engine.pool_is_whole()


def drive_one(engine: Engine, prompt: list[int], n: int) -> list[int]:
    rid = engine.add_request(prompt, None, n)
    return drive(engine)[rid]["tokens"]


def test_int8_kv_memory_is_codes_and_one_fp16_scale_per_token_and_head():
    m8, m16 = codegen_q.load(kv_dtype="int8"), codegen_q.load(kv_dtype="float16")
    cfg = m8.config
    per_token = 2 * cfg.n_layer * (cfg.n_embd + 2 * cfg.n_head)  # K and V: a byte per element, 2 per scale
    assert m8.memory(context=100)["kv_cache_bytes"] == 100 * per_token
    assert kv_cache_bytes(cfg, 100, torch.int8) == 100 * per_token
    assert m16.memory(context=100)["kv_cache_bytes"] == 100 * 2 * cfg.n_layer * cfg.n_embd * 2
    cache = m8.model.new_cache(64)
    assert cache.nbytes == kv_cache_bytes(cfg, cache.num_blocks * cache.block_size, torch.int8)


def test_the_shipped_model_on_int8_kv_stays_within_the_stated_bound_of_fp32_kv():
    models = {d: codegen_q.load(kv_dtype=d) for d in ("float32", "int8")}
    tokenizer = models["int8"].tokenizer
    with open(default_model.HELD_OUT_SAMPLE, encoding="utf-8") as f:
        sample = tokenizer.encode(f.read())
    vocab = min(len(tokenizer), models["int8"].config.vocab_size)
    for prompt_len in (40, 300):  # the paged kernel's prompt path, and torch's over read-back K/V
        logits = {}
        for name, lm in models.items():
            model = lm.model
            cache = model.new_cache(512)
            seq = cache.add_sequence()
            rows = [model.forward([torch.tensor(sample[:prompt_len])], cache, [seq], last_only=False)[0]]
            for t in sample[prompt_len:prompt_len + 40]:  # the same tokens fed to both (fused decode steps)
                rows.append(model.forward([torch.tensor([t])], cache, [seq])[0])
            logits[name] = torch.cat(rows)[:, :vocab]
        ref, got = logits["float32"], logits["int8"]
        bound = LOGIT_BOUND * float(ref.abs().max())
        assert (got - ref).abs().max() <= bound, prompt_len
        # Greedy picks agree wherever fp32's margin exceeds what the bound lets the logits move.
        top2 = ref.topk(2).values
        clear = top2[:, 0] - top2[:, 1] > 2 * bound
        assert clear.float().mean() > 0.5  # the comparison is not vacuous
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    # Free-running greedy text: identical up to the first step where fp32's margin is within reach
    # of the bound (margins of a few tenths are common in a small model, so over several prompts).
    compared = 0
    for prompt in GREEDY_PROMPTS:
        out = {name: lm.generate(prompt, max_new_tokens=48).token_ids for name, lm in models.items()}
        logits = continuation_logits(models["float32"], prompt, out["float32"], vocab)
        top2 = logits.topk(2).values
        within_reach = (top2[:, 0] - top2[:, 1] <= 2 * LOGIT_BOUND * float(logits.abs().max())).tolist()
        safe = within_reach.index(True) if True in within_reach else len(within_reach)
        assert out["int8"][:safe] == out["float32"][:safe], prompt
        compared += safe
    assert compared >= 40  # the comparison is not vacuous


GREEDY_PROMPTS = ["def fibonacci(n):\n    ", "import os\nimport sys\n", "class Foo:\n    def __init__(self",
                  "if __name__ == '__main__':\n    ", "        return self."]


def continuation_logits(lm, prompt: str, continuation: list[int], vocab: int) -> torch.Tensor:
    """fp32 KV's logits at each step of a continuation of ``prompt`` (the one each token was picked from)."""
    model = lm.model
    cache = model.new_cache(512)
    tokens = lm.tokenizer.encode(prompt) + continuation
    logits = model.forward([torch.tensor(tokens)], cache, [cache.add_sequence()], last_only=False)[0][:, :vocab]
    return logits[len(tokens) - len(continuation) - 1:-1]


def test_inspect_generate_serve_and_eval_take_kv_dtype(capsys):
    import json

    from codegen_q.cli.main import build_parser, main as cli_main

    path = default_model.QUANTIZED_DIR
    assert cli_main(["inspect", path, "--context", "100", "--kv-dtype", "int8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory"]["as stored"]
    cfg = codegen_q.load(path).config
    assert plan["kv_dtype_cpu"] == "int8" and plan["kv_cache_cpu"] == kv_cache_bytes(cfg, 100, torch.int8)
    # Both devices run an int8 cache with float32 activations (the GPU on the CUDA twins).
    assert plan["kv_dtype_gpu"] == "int8" and plan["kv_cache_gpu"] == kv_cache_bytes(cfg, 100, torch.int8)
    assert cli_main(["inspect", path, "--context", "100"]) == 0
    assert "float16" in capsys.readouterr().out  # the default, named
    parser = build_parser()
    for argv in (["generate", "x"], ["serve"], ["eval", path, "f.py"]):
        assert parser.parse_args([*argv, "--kv-dtype", "int8"]).kv_dtype == "int8"
        assert parser.parse_args(argv).kv_dtype == "auto"
    with pytest.raises(ValueError, match="int8 KV cache needs float32 activations"):
        codegen_q.load(path, kv_dtype="int8", dtype="bfloat16")
