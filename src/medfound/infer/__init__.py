"""medfound.infer stage (see DESIGN.md)."""
