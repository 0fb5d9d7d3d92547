"""__IMPL__: a moebench plugin (the implementation is in `moe.py`)."""
