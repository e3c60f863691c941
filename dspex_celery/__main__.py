from dspex_celery.cli import main

main()
