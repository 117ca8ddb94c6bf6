"""`python -m simu_jax.bench`: the same as `simu-jax bench`."""

from simu_jax.bench.cli import cli_main

raise SystemExit(cli_main())
