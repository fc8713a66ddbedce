"""learnreg.optimize."""
