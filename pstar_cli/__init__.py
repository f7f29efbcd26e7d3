"""pstar's command line: configs, data, the training loop and the `pstar` Typer app."""

__version__ = "0.1.0"
