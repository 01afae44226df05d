"""``python -m eval.loadtest``: run the load test (see :mod:`eval.loadtest.cli`)."""

from eval.loadtest.cli import main

raise SystemExit(main())
