"""learnreg.eval."""
