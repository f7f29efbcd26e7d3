"""`python -m pstar_cli` runs the same app as the `pstar` console script."""

from pstar_cli.main import main

if __name__ == "__main__":
    main()
