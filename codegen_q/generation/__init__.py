"""From a directory to text: loading a model ready to generate, tokens in and out.

    load.py        load(): a quantized or hub directory as a LoadedModel
    tokenizer.py   CodeGen's tokenizer on the `tokenizers` library
    sampling.py    greedy, temperature, top-k / top-p, penalties, seeds, logprobs
    engine.py      the Engine: requests joining and leaving one running batch, prefix caching
    generate.py    generate(): prompts through the Engine, stop sequences, streaming
    evaluation.py  perplexity and agreement with a reference model over files of code

May import codegen_q.format, codegen_q.kernels and codegen_q.model.
"""
