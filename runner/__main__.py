"""``python -m runner`` is the same as the ``qlora`` console script."""

from runner.cli import main

raise SystemExit(main())
