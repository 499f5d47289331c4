"""medfound.metrics stage (see DESIGN.md)."""
