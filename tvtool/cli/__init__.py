"""The typer application: one module per command (group). Torch is imported inside commands only."""
