"""Example modules shipped with dspex-celery (allow-listed on workers with --modules dspex_celery.examples)."""
