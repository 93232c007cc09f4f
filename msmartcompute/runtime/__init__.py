"""The engine behind every endpoint; no HTTP in here."""
