"""One module per ``python -m bench`` subcommand."""
