"""medfound.models stage (see DESIGN.md)."""
