"""The native kernels (`_C_cpu`, `_C_cuda`) and the checked Python calls into them.

    native.py         loads the extension modules (a CPU-only or compiler-less install still imports)
    openmp_policy.py  torch's OpenMP threads made passive before torch loads
    usable_cpus.py    the default thread count: affinity capped by the cgroup quota
    backends.py       what was built and what runs: ISA, threads, activation limbs
    ops.py            qlinear and dequantize: every argument checked, then the kernel chosen by M
    attention.py      rotary + KV append, paged attention, causal prompt attention

Everything else reaches the extension modules through native.py: these ops, and a few direct
calls with raw pointers (the fused decode step, the quantizer's pass, capability queries).

May import codegen_q.format (the weight layout).
"""
