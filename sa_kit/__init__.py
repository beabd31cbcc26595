"""sa-kit."""
