"""codegen_q.evaluate.evaluate() and `codegen-q eval`: strided perplexity on files, against
transformers computing the same windows, and quantized models against their float source."""

from __future__ import annotations

import inspect
import json
import json.decoder
import textwrap

import pytest
import torch
import transformers

from codegen_q.cli.main import main
from codegen_q.quantization.convert import quantize_checkpoint
from codegen_q.generation.evaluation import EvalResult, evaluate, find_files, windows
from codegen_q.generation.load import load
from codegen_q.testing.checkpoints import make_checkpoint, tiny_config

transformers.logging.set_verbosity_error()

N_POSITIONS = 64


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    hub = make_checkpoint(str(root / "hub"), tiny_config(n_embd=128, n_head=4, rotary_dim=16, n_positions=N_POSITIONS),
                          fmt="bin")
    out = {"hub": hub, "int8": str(root / "int8"), "int4": str(root / "int4")}
    quantize_checkpoint(hub, out["int8"], bits=8, progress=False)
    quantize_checkpoint(hub, out["int4"], bits=4, group_size=128, progress=False)
    return out


@pytest.fixture(scope="module")
def float_model(dirs):
    return load(dirs["hub"])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two files of real code, each many windows long, in a directory with things to skip."""
    root = tmp_path_factory.mktemp("src")
    with open(inspect.getsourcefile(json.decoder), encoding="utf-8") as f:
        (root / "decoder.py").write_text(f.read()[:5000], encoding="utf-8")
    with open(inspect.getsourcefile(textwrap), encoding="utf-8") as f:
        (root / "pkg").mkdir()
        (root / "pkg" / "wrap.py").write_text(f.read()[:2500], encoding="utf-8")
    (root / "pkg" / "notes.txt").write_text("not python", encoding="utf-8")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skipped.py").write_text("x = 1\n", encoding="utf-8")
    return root


def hf_nll(hf, tok, path, context: int, stride: int) -> tuple[float, int]:
    """Summed NLL of every token but the first of the file, each predicted by the earliest window
    (windows begin at 0, stride, 2 stride, ... and hold `context` tokens) that contains it."""
    with open(path, encoding="utf-8") as f:
        ids = tok(f.read())["input_ids"]
    by_begin: dict[int, list[int]] = {}
    for p in range(1, len(ids)):
        k = 0 if p < context else (p - context) // stride + 1
        by_begin.setdefault(k * stride, []).append(p)
    nll = 0.0
    for begin, targets in by_begin.items():
        with torch.no_grad():
            logits = hf(torch.tensor(ids[begin:begin + context])[None]).logits[0]
        logp = torch.log_softmax(logits[:, :len(tok)].double(), dim=-1)
        nll -= sum(float(logp[p - begin - 1, ids[p]]) for p in targets)
    return nll, len(ids) - 1


@pytest.mark.parametrize("context,stride", [(None, None), (48, 20)])
def test_float_perplexity_matches_transformers_on_the_same_windows(dirs, float_model, sources, context, stride):
    result = evaluate(float_model, [sources], context=context, stride=stride)
    hf = transformers.CodeGenForCausalLM.from_pretrained(dirs["hub"], torch_dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(dirs["hub"])
    context = context or N_POSITIONS
    stride = stride or context // 2
    files = [sources / "decoder.py", sources / "pkg" / "wrap.py"]
    per_file = [hf_nll(hf, tok, f, context, stride) for f in files]
    nll, tokens = sum(n for n, _ in per_file), sum(t for _, t in per_file)
    assert min(t for _, t in per_file) > 6 * context  # many windows per file
    assert (result.files, result.tokens, result.context, result.stride) == (2, tokens, context, stride)
    assert abs(result.nll - nll) <= 1e-4 * nll
    assert result.perplexity == pytest.approx(torch.tensor(nll / tokens).exp().item(), rel=1e-4)
    assert result.top1_agreement is result.mean_kl is result.reference_perplexity is None


@pytest.mark.parametrize("n_tokens,context,stride", [(0, 4, 2), (1, 4, 2), (2, 2, 1), (10, 4, 2), (11, 4, 3),
                                                      (64, 64, 32), (65, 64, 32), (100, 7, 6)])
def test_windows_predict_every_token_once_with_the_most_context(n_tokens, context, stride):
    scored = []
    for begin, end, first in windows(n_tokens, context, stride):
        assert begin % stride == 0 and end - begin <= context and begin < first <= end
        scored += [(p, p - begin) for p in range(first, end)]
    assert [p for p, _ in scored] == list(range(1, n_tokens))
    for p, left in scored:  # no window of the scheme gives p more left context
        assert left == p - max(0, (p - context) // stride + 1) * stride


def test_reference_itself_agrees_fully_and_quantized_models_diverge(dirs, float_model, sources):
    same = evaluate(float_model, sources / "decoder.py", reference=float_model)
    assert same.top1_agreement == 1 and abs(same.mean_kl) < 1e-6
    assert same.reference_perplexity == same.perplexity
    int4 = evaluate(dirs["int4"], sources / "decoder.py", reference=float_model)
    int8 = evaluate(dirs["int8"], sources / "decoder.py", reference=dirs["hub"])
    assert int4.top1_agreement < 1 and int4.mean_kl > 0
    assert int4.reference_perplexity == int8.reference_perplexity == same.perplexity
    assert 0 < int8.mean_kl < int4.mean_kl
    assert int8.tokens == int4.tokens == same.tokens


def test_a_reference_with_another_tokenizer_is_refused(dirs, float_model, sources):
    other = load(dirs["hub"])
    encode = other.tokenizer.encode
    other.tokenizer.encode = lambda text: encode(text)[::-1]
    with pytest.raises(ValueError, match="different tokenizer"):
        evaluate(float_model, sources, reference=other)


def test_files_are_found_recursively_sorted_and_by_pattern(sources):
    assert find_files([sources]) == [str(sources / "decoder.py"), str(sources / "pkg" / "wrap.py")]
    assert find_files(sources, pattern="*.txt") == [str(sources / "pkg" / "notes.txt")]
    named = [sources / "pkg" / "wrap.py", sources]  # given order kept, a file named twice taken once
    assert find_files(named) == [str(sources / "pkg" / "wrap.py"), str(sources / "decoder.py")]
    with pytest.raises(ValueError, match=r"no file matching \*\.rs"):
        find_files(sources, pattern="*.rs")


def test_progress_bar_counts_every_scored_token(float_model, sources, monkeypatch):
    import tqdm

    bars = []

    class Recorder:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    result = evaluate(float_model, sources, progress=True)
    assert len(bars) == 1 and bars[0].n == bars[0].total == result.tokens


def test_bad_inputs(float_model, sources, tmp_path):
    (tmp_path / "latin1.py").write_bytes("s = 'café'\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.py is not UTF-8 text \(byte 0xe9"):
        evaluate(float_model, [sources, tmp_path / "latin1.py"])
    (tmp_path / "one.py").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="no token to score"):
        evaluate(float_model, tmp_path / "one.py")
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate(float_model, tmp_path / "missing.py")
    with pytest.raises(ValueError, match="no files to evaluate"):
        evaluate(float_model, [])
    for context in (1, N_POSITIONS + 1, 8.0):
        with pytest.raises(ValueError, match="context must be an int from 2 to 64"):
            evaluate(float_model, sources, context=context)
    for stride in (0, 32):
        with pytest.raises(ValueError, match="stride must be"):
            evaluate(float_model, sources, context=32, stride=stride)


def test_cli_json_and_human_output(dirs, sources, capsys):
    file = str(sources / "decoder.py")
    assert main(["eval", dirs["int4"], file, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = evaluate(dirs["int4"], file)
    assert printed == expected.to_dict() and printed["perplexity"] == expected.perplexity
    assert set(printed) == set(EvalResult.__dataclass_fields__)
    assert main(["eval", dirs["int4"], str(sources), "--reference", dirs["hub"], "--context", "32",
                 "--device", "cpu", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "files: 2" in text and "context 32, stride 16" in text and "perplexity: " in text
    assert "reference perplexity: " in text and "top-1 agreement: " in text and "mean KL" in text
    assert main(["eval", dirs["int8"], file, "--reference", dirs["int8"]]) == 0
    assert "top-1 agreement: 100.00 %" in capsys.readouterr().out


def test_cli_errors_are_one_line(dirs, sources, tmp_path, capsys):
    (tmp_path / "bad.py").write_bytes(b"x = '\xff'\n")
    file = str(sources / "decoder.py")
    cases = [([str(tmp_path / "missing.py")], "no such file or directory"),
             ([file, "--context", "1"], "context must be"),
             ([file, "--context", str(N_POSITIONS + 1)], "context must be"),
             ([file, "--context", "16", "--stride", "16"], "stride must be"),
             ([str(tmp_path / "bad.py")], "is not UTF-8 text"),
             ([str(sources), "--pattern", "*.rs"], "no file matching")]
    for args, match in cases:
        assert main(["eval", dirs["int8"], *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("codegen-q: error: ") and match in err and err.count("\n") == 1, err
