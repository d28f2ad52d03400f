"""`python -m siamese`: the same command line as `utilities.py`."""

from siamese.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m siamese"))
