"""learnreg.io."""
