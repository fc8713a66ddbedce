"""learnreg.train."""
