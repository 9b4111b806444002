"""``python -m secvf`` runs the CLI."""

from secvf.faces.cli import main

main()
