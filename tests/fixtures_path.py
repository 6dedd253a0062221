"""Where the shared recorded fixtures live (``shared/`` sits beside the checkout)."""

from pathlib import Path

FIXTURES: Path = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
