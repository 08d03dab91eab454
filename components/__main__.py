"""Stage entry point: `python -m components <stage> --help` lists each stage's paths and the params it reads."""

import sys

from components.cli import main

sys.exit(main())
