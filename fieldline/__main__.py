"""`python -m fieldline` runs the CLI."""

from fieldline.cli import main

main()
