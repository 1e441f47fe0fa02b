"""``python -m posterfusion`` runs the CLI, for environments without the console script."""

from posterfusion.jobs.cli import main

main()
