"""`python -m pgmigrate_proxy`: the same as the `pgmigrate-proxy` command."""

from pgmigrate_proxy.cli import main

raise SystemExit(main())
