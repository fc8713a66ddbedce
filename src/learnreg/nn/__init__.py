"""learnreg.nn."""
