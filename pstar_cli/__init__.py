"""pstar's command line: configs, data, the training loop and the `pstar` Typer app."""

import warnings

# torch warns at import when numpy is missing; pstar never hands tensors to numpy, so the warning
# would only tell a user of a clean install about something that does not concern them.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__version__ = "0.1.0"
