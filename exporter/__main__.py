"""Run the exporter with `python -m exporter`."""

from .cli import main

raise SystemExit(main())
