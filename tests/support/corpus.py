"""Where the public mail corpus lives: shared/ beside the checkout (locally and in CI)."""

from pathlib import Path

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "mail"
