"""medfound.export stage (see DESIGN.md)."""
