"""Stage wrappers: each `run_<stage>` does the file I/O, gates and tracking around a pure core."""
