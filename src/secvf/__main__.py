"""``python -m secvf`` runs the CLI."""

from secvf.cli import main

main()
