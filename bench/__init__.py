"""ftmem's measurement library: cell specs, model building, the measured step, the runners.

Importing `bench` imports no torch; the modules that need it (build, train, measure, worker)
import it themselves.
"""

__version__ = "0.1.0"
