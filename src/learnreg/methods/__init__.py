"""learnreg.methods."""
