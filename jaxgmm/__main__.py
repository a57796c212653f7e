"""``python -m jaxgmm``: the ``jaxgmm`` command line."""

from ._cli import main

raise SystemExit(main())
