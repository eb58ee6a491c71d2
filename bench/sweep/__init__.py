"""Sweeps: grid files expanded into cell specs (grid, with strict YAML) and the runner that measures them,
resumable, one process per cell (run)."""
