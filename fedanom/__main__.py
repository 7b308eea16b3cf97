"""`python -m fedanom` runs the command line."""

from fedanom.cli import run

run()
