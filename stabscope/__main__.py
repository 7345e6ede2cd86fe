"""``python -m stabscope`` runs the CLI."""

from .cli import main

main()
