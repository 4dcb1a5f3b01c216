"""What is on disk, and nothing of how it is computed with.

    scheme.py       the quantization schemes (bits, group sizes, lm_head) and their one check
    config.py       config.json: CodeGenConfig and its "quantization" section
    schema.py       tensor names and shapes, the files of a directory, the qkv_proj row reorder
    weight.py       the quantized weight layout: QuantizedWeight, int4 packing
    safetensors.py  safetensors dtype codes and headers, and the streaming writer
    hub.py          reading checkpoints as the hub ships them
    writer.py       writing our quantized directory: shards, index, tokenizer files
    manifest.py     the directory's checksums, written last and verified on load
    reader.py       opening our quantized directory (mmap'd, verified)

May import codegen_q.io.
"""
