"""The original toolkit's entry point: `python utilities.py ...` is the siamese command line (see `--help`)."""

from siamese.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
