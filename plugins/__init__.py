"""Built-in eebench plugins, registered through the `eebench` entry-point group."""
