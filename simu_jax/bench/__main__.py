"""`python -m simu_jax.bench`: the same as `simu-jax bench`."""

from simu_jax.host_memory import keep_freed_host_memory

keep_freed_host_memory()  # as `simu-jax` does at start (simu_jax.host_memory)

from simu_jax.bench.cli import cli_main  # noqa: E402

raise SystemExit(cli_main())
