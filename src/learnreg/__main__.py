"""``python -m learnreg`` runs the command line."""

from learnreg.cli.main import main

main()
