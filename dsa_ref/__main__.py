"""``python -m dsa_ref`` is the ``dsa-ref`` command."""

from .cli import main

raise SystemExit(main())
