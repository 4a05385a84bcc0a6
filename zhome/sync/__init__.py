"""Stream positions, the notifier and /sync assembly."""
