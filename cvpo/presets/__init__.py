"""Per-task-family preset files (TOML), applied between defaults and user overrides."""
