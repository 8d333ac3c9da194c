"""Criteria with trainable parameters or state, grouped by knowledge family: each file holds the
factories it registers (`@criterion(module=True)`) and the modules they build."""
