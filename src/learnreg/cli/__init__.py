"""learnreg.cli."""
