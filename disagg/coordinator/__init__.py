"""The coordinator: the single owner of every request from arrival to finish."""
