"""The CodeGen forward pass on quantized weights, and the memory it runs in.

    codegen.py       CodeGenModel: embedding, blocks, lm_head; prompt and decode steps
    fused_decode.py  the whole decode step as one native call on the CPU
    kv_cache.py      the paged KV cache and its block pool (prefix blocks shared by hash)
    block_tables.py  each sequence's block table kept on the device, updated incrementally
    memory_plan.py   KV-cache and activation sizes: what a context and batch cost

May import codegen_q.format and codegen_q.kernels.
"""
