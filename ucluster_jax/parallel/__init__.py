"""Data parallelism over local devices and MPI ranks; the train step never imports this."""
