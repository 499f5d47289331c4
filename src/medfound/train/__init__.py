"""medfound.train stage (see DESIGN.md)."""
