"""`python -m blit`: the blit command."""

from .entry import main

main()
