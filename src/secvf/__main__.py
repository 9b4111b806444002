"""``python -m secvf`` runs the CLI."""

from secvf.faces.cli.main import main

main()
