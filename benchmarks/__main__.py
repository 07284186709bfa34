"""``python -m benchmarks [--size N]``: run every benchmark and print the table."""

from benchmarks.harness import main

if __name__ == "__main__":
    raise SystemExit(main())
