"""`python -m daop_vllm.cli`: the `daop-vllm` command."""

import sys

from daop_vllm.cli import main

sys.exit(main())
