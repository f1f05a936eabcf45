"""`python -m bqat.export RUN_DIR`, the same as `bqat-export RUN_DIR`."""

from bqat.export.cli import main

if __name__ == "__main__":
    main()
