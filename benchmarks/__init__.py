"""Speed and memory benchmarks; each module is a script (``python benchmarks/<topic>.py``)."""
