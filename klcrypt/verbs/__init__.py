"""One module per CLI verb (see klcrypt.cli.VERBS)."""
