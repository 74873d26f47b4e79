"""The measurement engine: torch and transformers only, no database."""
