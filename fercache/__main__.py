"""`python -m fercache` (what torchrun launches) runs the CLI."""

from .cli import main

main()
