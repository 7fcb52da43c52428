"""``python -m xattn`` runs the CLI (also what ``accelerate launch -m xattn`` starts)."""

from xattn.cli import main

if __name__ == "__main__":
    main()
