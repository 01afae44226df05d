"""``python -m cascade.simulate``: run the simulated OpenAI-compatible server in the foreground."""

from cascade.simulate.server import main

raise SystemExit(main())
