"""Console commands. Each ``main`` goes through :func:`sfs_fast.cli.common.run_command`."""
