"""``python -m pb_lightning.lightning``: the same LightningCLI as ``pb-lightning``."""

from pb_lightning.lightning.cli import console

if __name__ == "__main__":
    console()
