"""``python -m nurture`` runs the ``nurture`` command."""

from nurture.cli import main

if __name__ == "__main__":  # spawned child processes import this module too
    main()
