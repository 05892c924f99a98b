"""`python -m edgeops` runs the CLI."""

from .cli import main

main()
