"""evaluate(): how well a model predicts a user's own code (perplexity), and how far a quantized
model's predictions are from its float source's (top-1 agreement, KL divergence).

Each file is tokenized on its own and scored in sliding windows of `context` tokens that advance
by `stride` (the usual strided perplexity): every token but a file's first is predicted exactly
once, by the first window that holds it, which is the one giving it the most left context, and
only the tokens the previous window did not reach count in a window. A window runs on a fresh
KV cache, so windows are independent and memory is one window's, whatever the file's length.
"""

from __future__ import annotations

import fnmatch
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

DEFAULT_PATTERN = "*.py"
# Text the two tokenizers must turn into the same ids: code, CodeGen's whitespace tokens (runs of
# spaces and tabs) and bytes outside ASCII.
TOKENIZER_PROBE = "def f(x):\n        return x + 1  # é, ∑, 😀\n\t\tpass\n"


@dataclass
class EvalResult:
    """What evaluate() measured. `tokens` counts the scored (predicted) tokens; `nll` is their
    summed negative log-likelihood in nats. The last three are set only with a reference model."""

    files: int
    tokens: int
    nll: float
    perplexity: float
    context: int
    stride: int
    top1_agreement: float | None = None
    mean_kl: float | None = None
    reference_perplexity: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(model, sources, reference=None, context: int | None = None, stride: int | None = None,
             progress: bool = False, pattern: str = DEFAULT_PATTERN) -> EvalResult:
    """Score `sources` (files, and directories searched recursively for `pattern`) with `model`.

    `model` and `reference` are LoadedModel objects or model directories. With a reference, the
    same windows also go through it, and the result says how often the two models' most likely
    next tokens agree and the mean KL(reference || model) per token. `context` (default: the
    model's n_positions) is the window length, `stride` (default context // 2) how far a window
    moves, so each scored token after the first window has at least context - stride tokens of
    left context. `progress` draws a bar over the tokens on stderr.
    """
    paths = find_files(sources, pattern)
    model, reference = _loaded(model), None if reference is None else _loaded(reference)
    if reference is not None:
        check_same_tokenizer(model, reference)
    context, stride = _window_sizes(model, reference, context, stride)
    vocab = _vocab_limit(model, reference)
    total = _check_files(paths, model.tokenizer if progress else None)
    totals = _Totals()
    with _progress_bar(total) as bar:
        for path in paths:
            ids = model.tokenizer.encode(read_source(path))
            _score(ids, model, reference, context, stride, vocab, totals, bar)
    if totals.tokens == 0:
        raise ValueError(f"the {len(paths)} file(s) hold no token to score: each file needs at least 2 tokens")
    return totals.result(len(paths), context, stride)


def _score(ids: list[int], model, reference, context: int, stride: int, vocab: int, totals: "_Totals", bar) -> None:
    """Add one file's windows to `totals`."""
    for begin, end, first in windows(len(ids), context, stride):
        window = ids[begin:end]
        targets = torch.tensor(window[first - begin:])
        rows = slice(first - begin - 1, end - begin - 1)  # logits row i predicts window[i + 1]
        logp = _log_probs(model, window, rows, vocab)
        ref_logp = None if reference is None else _log_probs(reference, window, rows, vocab)
        totals.add(logp, ref_logp, targets)
        bar.update(len(targets))


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over a file of n_tokens: the window is
    tokens[begin:end] and scores tokens first_scored..end-1 (never a file's token 0)."""
    scored_up_to, begin = 1, 0
    while scored_up_to < n_tokens:
        end = min(begin + context, n_tokens)
        yield begin, end, scored_up_to
        scored_up_to, begin = end, begin + stride


def find_files(sources, pattern: str = DEFAULT_PATTERN) -> list[str]:
    """The files named by `sources` (one path, or several), in order, with each directory replaced
    by its files matching `pattern`, found recursively and sorted; hidden subdirectories (.git,
    .venv, ...) are skipped. A file named twice is scored once."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    found: dict[str, None] = {}
    for source in sources:
        source = os.fspath(source)
        if os.path.isdir(source):
            found.update(dict.fromkeys(_walk(source, pattern)))
        elif os.path.exists(source):
            found[source] = None
        else:
            raise FileNotFoundError(f"no such file or directory: {source}")
    if not found:
        raise ValueError(f"no files to evaluate: no file matching {pattern} in {', '.join(map(os.fspath, sources))}"
                         if sources else "no files to evaluate: no file or directory given")
    return list(found)


def _walk(root: str, pattern: str) -> list[str]:
    paths = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        paths += [os.path.join(directory, n) for n in names if fnmatch.fnmatch(n, pattern)]
    return sorted(p for p in paths if os.path.isfile(p))


def read_source(path: str) -> str:
    """The file's text, decoded as UTF-8 exactly (newlines as they are, a leading BOM dropped)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def check_same_tokenizer(model, reference) -> None:
    """Comparing two models' predictions token by token needs the same token ids in both."""
    a, b = model.tokenizer, reference.tokenizer
    if len(a) != len(b) or a.encode(TOKENIZER_PROBE) != b.encode(TOKENIZER_PROBE):
        raise ValueError(f"the reference model {reference.path} has a different tokenizer from {model.path} "
                         f"({len(b)} vs {len(a)} tokens): their predictions cannot be compared token by token")


def _loaded(model):
    """A LoadedModel, loading a directory path with load()'s defaults."""
    if isinstance(model, (str, os.PathLike)):
        from codegen_q.generation.load import load

        return load(model)
    return model


def _window_sizes(model, reference, context, stride) -> tuple[int, int]:
    limit, whose = model.config.n_positions, "the model's"
    if reference is not None and reference.config.n_positions < limit:
        limit, whose = reference.config.n_positions, "the reference model's"
    context = limit if context is None else context
    if isinstance(context, bool) or not isinstance(context, int) or not 2 <= context <= limit:
        raise ValueError(f"context must be an int from 2 to {limit} ({whose} n_positions), got {context!r}")
    stride = context // 2 if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride < context:
        raise ValueError(f"stride must be an int from 1 to context - 1 = {context - 1} (a window must "
                         f"overlap the previous one for every token to be predicted), got {stride!r}")
    return context, stride


def _vocab_limit(model, reference) -> int:
    """Logit columns that are real tokens: the rows of the lm_head past the tokenizer are padding."""
    models = [model] if reference is None else [model, reference]
    return min([len(model.tokenizer)] + [m.config.vocab_size for m in models])


def _check_files(paths: list[str], tokenizer=None) -> int | None:
    """A cheap pass before the model's, one file at a time: that every file is text (so a bad one
    fails now, not after the files before it were scored) and, given a tokenizer, how many tokens
    evaluate() will score, for the progress bar."""
    total = 0
    for path in paths:
        text = read_source(path)
        if tokenizer is not None:
            total += max(len(tokenizer.encode(text)) - 1, 0)
    return None if tokenizer is None else total


def _log_probs(loaded, window: list[int], rows: slice, vocab: int) -> torch.Tensor:
    """float64 log-probabilities [rows, vocab] of the next token at `rows` of the window."""
    m = loaded.model
    cache = m.new_cache(len(window))
    seq = cache.add_sequence()
    logits = m.forward([torch.tensor(window)], cache, [seq], last_only=False)[0]
    return torch.log_softmax(logits[rows, :vocab].double(), dim=-1)


class _Totals:
    """Running sums over the scored tokens, so no more than one window's logits are kept."""

    def __init__(self) -> None:
        self.tokens, self.nll, self.ref_nll, self.agree, self.kl = 0, 0.0, 0.0, 0, 0.0
        self.with_reference = False

    def add(self, logp: torch.Tensor, ref_logp: torch.Tensor | None, targets: torch.Tensor) -> None:
        self.tokens += len(targets)
        self.nll -= float(logp.gather(1, targets[:, None]).sum())
        if ref_logp is not None:
            self.with_reference = True
            self.ref_nll -= float(ref_logp.gather(1, targets[:, None]).sum())
            self.agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            self.kl += float((ref_logp.exp() * (ref_logp - logp)).sum())

    def result(self, files: int, context: int, stride: int) -> EvalResult:
        n = self.tokens
        out = EvalResult(files=files, tokens=n, nll=self.nll, perplexity=_perplexity(self.nll, n), context=context,
                         stride=stride)
        if self.with_reference:
            out.top1_agreement, out.mean_kl = self.agree / n, self.kl / n
            out.reference_perplexity = _perplexity(self.ref_nll, n)
        return out


def _perplexity(nll: float, tokens: int) -> float:
    try:
        return math.exp(nll / tokens)
    except OverflowError:
        return math.inf


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress_bar(total: int | None):
    """A tqdm bar on stderr over `total` tokens, or one that draws nothing when total is None."""
    if total is None:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="eval", unit="tok", unit_scale=True, file=sys.stderr, leave=False)


__all__ = ["EvalResult", "evaluate", "find_files", "read_source", "windows"]
