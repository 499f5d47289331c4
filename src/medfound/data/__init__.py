"""medfound.data stage (see DESIGN.md)."""
