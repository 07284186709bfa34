"""``python -m nurture`` runs the ``nurture`` command."""

from nurture.cli import main

main()
