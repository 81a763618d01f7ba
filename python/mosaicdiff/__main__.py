"""`python -m mosaicdiff ...` is the same as the `mosaicdiff` console script."""

from mosaicdiff.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
