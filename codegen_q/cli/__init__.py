"""The `codegen-q` command (main.py) and its subcommands: generate.py, eval.py, inspect.py,
serve.py (serve_ray.py for --ray). Turns arguments into calls of the library and errors into one
line and a non-zero exit. Nothing imports it.

May import anything in codegen_q.
"""
