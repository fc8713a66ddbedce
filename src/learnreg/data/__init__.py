"""learnreg.data."""
