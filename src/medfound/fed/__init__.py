"""medfound.fed stage (see DESIGN.md)."""
