"""`python -m flashmoe` runs the command line."""

from flashmoe.cli import app

app()
