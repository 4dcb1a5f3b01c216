"""`python -m codegen_q ...`: the `codegen-q` command."""

import sys

from codegen_q.cli.main import main

sys.exit(main())
