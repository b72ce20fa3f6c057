"""vaultctl: the one command-line tool for providers, operators and auditors."""
