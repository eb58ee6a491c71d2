"""The cell's process: the parent's runner (timeout, the row on a crash), the fresh or forked worker, the
fork server (preload, forked), process-tree and host-memory handling (procs), and inside the worker the
measurement routine (measure) with its NVML sampling, provenance (env), profiling and artifacts."""
