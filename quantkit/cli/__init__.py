"""The `quantkit` command line: thin commands over the library API."""
