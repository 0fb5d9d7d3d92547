"""Built-in implementations, one file each; importing a file registers it."""
