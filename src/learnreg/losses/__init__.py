"""learnreg.losses."""
