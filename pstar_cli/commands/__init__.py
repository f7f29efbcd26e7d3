"""One module per `pstar` subcommand; each defines a function named `command`."""
