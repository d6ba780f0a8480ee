"""`python -m jobforge.nomad OUT_DIR [--image IMAGE] [--datacenter DC]`: render the default jobs."""

import sys

from jobforge.nomad.render import main

sys.exit(main())
