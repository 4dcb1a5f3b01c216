"""File I/O under the formats: POSIX helpers (posix.py), O_DIRECT writing (direct_file.py) and
reading (direct_read.py), and the staged, locked, all-or-nothing output directory (output_dir.py).

Knows nothing of models or tensors' meaning.

May import nothing else of codegen_q.
"""
