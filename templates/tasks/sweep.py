#!/usr/bin/env python3
"""Sweep: remove the containers left in the storage by killed buildah runs, unless a running step holds the
storage's containers lock (`containers_lease` in _common.py). The local backend runs it at start (`reap()`), as
the account the phases run as, so a build user's rootless storage is only ever changed by that user."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import main, sweep_containers  # noqa: E402

if __name__ == "__main__":
    main(sweep_containers)
