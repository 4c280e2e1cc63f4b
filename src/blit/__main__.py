"""`python -m blit`: the blit command."""

from .cli import main

main()
