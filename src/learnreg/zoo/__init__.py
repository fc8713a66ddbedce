"""learnreg.zoo."""
