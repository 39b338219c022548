"""``python -m asyncassets``: the same as the ``asyncassets`` command."""

from .cli import main

raise SystemExit(main())
