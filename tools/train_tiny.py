#!/usr/bin/env python3
"""Train the small CodeGen that ships as codegen-q's default model.

    python tools/train_tiny.py OUT [--steps 1400] [--seed 0] [--threads 2] [--force]

The architecture is CodeGen's exactly (transformers' CodeGenForCausalLM, saved in the hub's
layout: config.json keys, tensor names, fp16 safetensors, CodeGen's tokenizer files), so every
path of codegen-q and transformers load it unchanged. head_dim 64 and rotary_dim 32 are
CodeGen-350M's; the width, depth and context are what two CPU cores train in about 45 minutes
(see --help for the defaults and docs/default-model.md for why).

Corpus: the ``.py`` files of the running Python's standard library (test packages and
site-packages excluded), licensed under the PSF License Agreement. About 5 % of the files, chosen
by a hash of their path, are held out: never used for the tokenizer or the weights, and the
held-out perplexity in OUT/training_log.json is measured on them.

Deterministic for a seed, a Python (its standard library is the corpus), a torch version and a
thread count (the order of floating-point sums follows the threads).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time

import torch

from codegen_q.io.output_dir import writing_output_dir
from codegen_q.testing.tokenizer_files import write_tokenizer_files
from codegen_q.generation.tokenizer import CodeGenTokenizer

# Packages of the standard library that are its own tests, not code people write.
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# One file in this many is held out (by path hash, so the split does not depend on the seed).
HELD_OUT_ONE_IN = 20
CORPUS_LICENCE = "PSF-2.0 (Python Software Foundation License Agreement), the licence of CPython's standard library"


def corpus_files(root: str) -> list[str]:
    """Relative paths of the standard library's .py files, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    return sorted(out)


def is_held_out(rel_path: str) -> bool:
    return hashlib.sha256(rel_path.encode()).digest()[0] % HELD_OUT_ONE_IN == 0


def read_texts(root: str, rel_paths: list[str]) -> dict[str, str]:
    texts = {}
    for rel in rel_paths:
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:  # a few test fixtures are deliberately not UTF-8
            continue
        if text.strip():
            texts[rel] = text
    return texts


def token_stream(tokenizer: CodeGenTokenizer, texts: dict[str, str]) -> torch.Tensor:
    """Every file's tokens followed by <|endoftext|>, concatenated (int64)."""
    ids: list[int] = []
    for text in texts.values():
        ids += tokenizer.encode(text)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)


def model_config(args, tokenizer_size: int, eos: int):
    import transformers

    # Rows past the tokenizer's ids are padding, as in the real models (50295 ids, 51200 rows).
    vocab_rows = -(-(tokenizer_size + 1) // 128) * 128
    return transformers.CodeGenConfig(
        vocab_size=vocab_rows, n_positions=args.context, n_ctx=args.context, n_embd=args.n_embd,
        n_layer=args.n_layer, n_head=args.n_embd // 64, rotary_dim=32, n_inner=None,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, initializer_range=0.02, bos_token_id=eos, eos_token_id=eos,
        tie_word_embeddings=False, torch_dtype="float16")


def learning_rate(step: int, args) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int, batch: int, vocab_limit: int,
               max_windows: int | None = None) -> float:
    """exp(mean NLL) over consecutive windows of the stream (each token after a window's first
    predicted once), padding logits masked as the runtime masks them."""
    windows = stream[: (len(stream) - 1) // seq_len * seq_len + 1]
    starts = list(range(0, len(windows) - 1, seq_len))[:max_windows]
    nll, count = 0.0, 0
    model.eval()
    for i in range(0, len(starts), batch):
        rows = torch.stack([stream[s: s + seq_len + 1] for s in starts[i: i + batch]])
        logits = model(rows[:, :-1]).logits[..., :vocab_limit].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_limit), rows[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += float(loss)
        count += rows[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


def train(args) -> int:
    import transformers
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    root = sysconfig.get_paths()["stdlib"]
    files = corpus_files(root)
    train_files, held_files = [f for f in files if not is_held_out(f)], [f for f in files if is_held_out(f)]
    if args.max_files:  # a quick run (tests): the first files of each split
        train_files, held_files = train_files[:args.max_files], held_files[:max(1, args.max_files // HELD_OUT_ONE_IN)]
    train_texts, held_texts = read_texts(root, train_files), read_texts(root, held_files)
    started = time.perf_counter()
    with writing_output_dir(args.out, force=args.force) as tmp:
        tok_info = write_tokenizer_files(tmp, vocab_size=args.vocab, model_max_length=args.context,
                                         corpus=list(train_texts.values()))
        tokenizer = CodeGenTokenizer.from_dir(tmp)
        train_ids, held_ids = token_stream(tokenizer, train_texts), token_stream(tokenizer, held_texts)
        cfg = model_config(args, tok_info["size"], tok_info["eos_token_id"])
        model = transformers.CodeGenForCausalLM(cfg)
        vocab_limit = tok_info["size"]
        params = sum(p.numel() for p in model.parameters())
        print(f"corpus: {len(train_texts)} training files ({len(train_ids) / 1e6:.2f} M tokens), {len(held_texts)} "
              f"held out ({len(held_ids) / 1e6:.2f} M tokens); tokenizer {vocab_limit} ids; model "
              f"{params / 1e6:.2f} M parameters", file=sys.stderr)
        decay = [p for n, p in model.named_parameters() if p.dim() == 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
        order = torch.Generator().manual_seed(args.seed)
        curve, evals = [], []
        span = args.seq_len + 1
        model.train()
        bar = tqdm(range(args.steps), desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)
        for step in bar:
            starts = torch.randint(0, len(train_ids) - span, (args.batch,), generator=order)
            rows = torch.stack([train_ids[s: s + span] for s in starts.tolist()])
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, args)
            logits = model(rows[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = loss.item()
            curve.append([step + 1, round(value, 4)])
            bar.set_postfix_str(f"loss {value:.3f}", refresh=False)
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                ppl = perplexity(model, held_ids, args.seq_len, args.batch, vocab_limit, max_windows=64)
                evals.append([step + 1, round(ppl, 4)])
                bar.write(f"step {step + 1}: held-out perplexity (first 64 windows) {ppl:.3f}", file=sys.stderr)
        bar.close()
        seconds = time.perf_counter() - started
        held_ppl = perplexity(model, held_ids, args.seq_len, args.batch, vocab_limit)
        model.half().save_pretrained(tmp, safe_serialization=True)
        log = {
            "corpus": {"python": platform.python_version(), "source": "the standard library's .py files",
                       "licence": CORPUS_LICENCE, "training_files": len(train_texts),
                       "held_out_files": sorted(held_texts), "training_tokens": len(train_ids),
                       "held_out_tokens": len(held_ids)},
            "model": {"parameters": params, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                      "head_dim": cfg.n_embd // cfg.n_head, "rotary_dim": cfg.rotary_dim,
                      "n_positions": cfg.n_positions, "vocab_rows": cfg.vocab_size, "tokenizer_size": vocab_limit},
            "training": {"seed": args.seed, "threads": args.threads, "steps": args.steps, "batch": args.batch,
                         "seq_len": args.seq_len, "lr": args.lr, "warmup": args.warmup,
                         "weight_decay": args.weight_decay, "tokens_seen": args.steps * args.batch * args.seq_len,
                         "seconds": round(seconds, 1), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "loss_curve": curve, "held_out_curve": evals,
            "held_out": {"perplexity_fp32": round(held_ppl, 4), "windows": f"consecutive, {args.seq_len} tokens",
                         "note": "every held-out file followed by <|endoftext|>, concatenated"},
        }
        with open(os.path.join(tmp, "training_log.json"), "w", encoding="utf-8") as f:
            json.dump(log, f, indent=1)
    print(f"wrote {args.out}: {params / 1e6:.2f} M parameters, {args.steps} steps in {seconds / 60:.1f} min, "
          f"final loss {curve[-1][1]:.3f}, held-out perplexity {held_ppl:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="output model directory (hub layout)")
    p.add_argument("--steps", type=int, default=1100)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence")
    p.add_argument("--context", type=int, default=512, help="the model's n_positions")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256, help="a multiple of 256 (heads of 64, 4 model-parallel chunks)")
    p.add_argument("--vocab", type=int, default=4058, help="BPE ids including <|endoftext|> (38 whitespace "
                                                          "tokens come on top)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-files", type=int, default=None, help="train on the first N files only (a quick check)")
    args = p.parse_args(argv)
    if args.n_embd % 256:
        p.error("--n-embd must be a multiple of 256")
    if args.seq_len > args.context:
        p.error("--seq-len must not exceed --context")
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
