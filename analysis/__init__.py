"""ftmem's analysis: prediction, loading, claims, tables, fits and plots from results files.

Never imports torch: it reads results files, so it runs on any machine.
"""
