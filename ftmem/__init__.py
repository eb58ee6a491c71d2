"""ftmem's command line: the one home that imports both the measuring side (bench) and the analysis side
(analysis); neither of those imports it. `ftmem.cli.main` is the console script."""
