"""`python -m quantkit ...`: the same CLI as the `quantkit` console script."""

from quantkit.cli.main import main

if __name__ == "__main__":
    main()
