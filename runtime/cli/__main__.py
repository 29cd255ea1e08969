"""`python -m megacpp.runtime.cli`: the same entry point as the `megacpp` command."""

from megacpp.runtime.cli.app import main

main()
