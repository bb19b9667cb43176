#!/usr/bin/env python
"""Run the experiment grid (``--help``); the same as ``imgcls-run``: imgcls.pipeline.cli.main."""

import sys

from imgcls.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
